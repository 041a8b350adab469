"""The SmolLM2 default artifact (`quaff-fx transform --out DIR`) is byte-identical to the golden digests in
tests/golden/smollm2_default.json: refactors must not change what quaff-fx writes (slow: one SmolLM2 transform,
shared with test_smollm2 through the `smollm2_artifact` fixture).

The golden file records per-tensor SHA-256 digests (model and stats), a digest of each top-level entry of
quaff.json, of the tokenizer files, and the torch version and CPU capability that wrote them. It is compared only
under the torch version that wrote it (kernels and float reductions may change between versions); a different CPU
capability is named in the failure message. After a deliberate change of the artifact, regenerate it:

    python3 tests/test_golden.py            # builds the default artifact (minutes), writes the golden file
    python3 tests/test_golden.py DIR        # digests an artifact folder already built
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

GOLDEN = Path(__file__).parent / "golden" / "smollm2_default.json"
# where the machine legitimately shows through: the installed model's folder
MACHINE_FIELDS = {"source": ("path",)}


def tensor_digests(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor's raw bytes, with its dtype and shape, by name."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            out[name] = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} {hashlib.sha256(raw).hexdigest()}"
    return out


def manifest_digests(path: Path) -> dict[str, str]:
    """SHA-256 of each top-level entry of quaff.json (canonical JSON), machine-specific fields left out."""
    manifest = json.loads(path.read_text())
    out = {}
    for key, value in sorted(manifest.items()):
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in MACHINE_FIELDS.get(key, ())}
        out[key] = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    return out


def artifact_digests(folder: Path) -> dict:
    folder = Path(folder)
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "manifest": manifest_digests(folder / "quaff.json"),
        "tokenizer": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted((folder / "tokenizer").iterdir())},
        "tensors": {name: tensor_digests(folder / name) for name in ("model.safetensors", "stats.safetensors")},
    }


def differences(golden: dict, now: dict) -> list[str]:
    """What differs, one line per item (a tensor, a manifest entry, a file), at most 20 lines."""
    lines = []
    for section in ("manifest", "tokenizer"):
        for key in sorted(set(golden[section]) | set(now[section])):
            if golden[section].get(key) != now[section].get(key):
                lines.append(f"{section} {key}: {golden[section].get(key)} -> {now[section].get(key)}")
    for file in sorted(set(golden["tensors"]) | set(now["tensors"])):
        old, new = golden["tensors"].get(file, {}), now["tensors"].get(file, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                lines.append(f"{file} {name}: {old.get(name)} -> {new.get(name)}")
    return lines[:20] + ([f"... {len(lines) - 20} more"] if len(lines) > 20 else [])


@pytest.mark.slow
def test_default_artifact_matches_the_golden_digests(smollm2_artifact):
    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"the golden digests were written under torch {golden['torch']}, this is {torch.__version__} "
                    f"(regenerate: python3 tests/test_golden.py)")
    now = artifact_digests(smollm2_artifact)
    diff = differences(golden, now)
    cpu = ("" if golden["cpu_capability"] == now["cpu_capability"] else
           f" (written on CPU capability {golden['cpu_capability']}, this is {now['cpu_capability']})")
    assert not diff, f"the default artifact changed{cpu}:\n" + "\n".join(diff)


def test_differences_name_what_changed(tmp_path):
    """The comparison itself (fast): a changed tensor, a changed manifest entry and a new file are each named."""
    from safetensors.torch import save_file

    folder = tmp_path / "a"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "quaff.json").write_text(json.dumps({"config": {"x": 1}, "source": {"path": "/here", "name": "m"}}))
    tensors = {"w": torch.arange(6, dtype=torch.int8).reshape(2, 3), "s": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(folder / "model.safetensors"))
    save_file({"x.max_abs": torch.zeros(3)}, str(folder / "stats.safetensors"))
    golden = artifact_digests(folder)
    assert differences(golden, artifact_digests(folder)) == []
    (folder / "quaff.json").write_text(json.dumps({"config": {"x": 1}, "source": {"path": "/there", "name": "m"}}))
    assert differences(golden, artifact_digests(folder)) == []  # the install path is the machine's, not ours
    tensors["w"][0, 0] = 1
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "quaff.json").write_text(json.dumps({"config": {"x": 2}, "source": {"path": "/here", "name": "m"}}))
    (folder / "tokenizer" / "extra.txt").write_text("new")
    diff = differences(golden, artifact_digests(folder))
    assert [line.split(":")[0] for line in diff] == ["manifest config", "tokenizer extra.txt", "model.safetensors w"]


def main(argv: list[str]) -> int:
    """Write the golden file from an artifact folder (argv[0]) or from a fresh `quaff-fx transform`."""
    import tempfile

    from quaff_fx.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(argv[0]) if argv else Path(tmp) / "smollm2-quaff"
        if not argv and cli(["transform", "--out", str(folder)]) != 0:
            return 1
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(artifact_digests(folder), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
