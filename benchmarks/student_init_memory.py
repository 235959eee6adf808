"""`distill student init`: peak RSS against the teacher's float32 size (issue 14, acceptance 5).

    python benchmarks/student_init_memory.py                                   # the embedded teacher, 8 layers
    git archive HEAD | tar -x -C /tmp/headtree                                 # an older tree to compare with
    python benchmarks/student_init_memory.py --compare-tree /tmp/headtree

Each `distill student init --from TEACHER --layers K --output DIR` runs in a fresh process; its peak RSS is the
ru_maxrss that os.wait4 returns for that child alone. `floor` is a child that only imports what student init imports
and reads the config and tokenizer, so `ours - floor` is what copying the tensors costs. With --compare-tree the
same command runs with that tree first on PYTHONPATH (the code before the copy loaded the teacher in float32), and
the two students' files are compared byte for byte. Target: our peak RSS below the teacher's float32 size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = (
    "from sft.prune import *; from pipeline.models import resolve_model; import sys;"
    " folder = teacher_folder(resolve_model(sys.argv[1])); AutoConfig.from_pretrained(folder);"
    " AutoTokenizer.from_pretrained(folder)"
)


def child_peak_mib(argv: list[str], pythonpath: Path) -> float:
    """Peak RSS of one fresh child process (MiB); raises if it fails."""
    env = os.environ | {"PYTHONPATH": str(pythonpath)}
    process = subprocess.Popen(argv, env=env, cwd=pythonpath, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def teacher_float32_bytes(teacher: str) -> tuple[int, int, set[str]]:
    """Parameters x 4 bytes, from the safetensors headers alone (no tensor is read)."""
    sys.path.insert(0, str(REPO))
    from pipeline.models import resolve_model
    from sft.prune import _shard_tensors, _teacher_shards, teacher_folder

    tensors = [t for shard in _teacher_shards(teacher_folder(resolve_model(teacher))) for t in _shard_tensors(shard)]
    params = sum(_numel(t.shape) for t in tensors)
    return params, 4 * params, {t.dtype for t in tensors}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--compare-tree", type=Path, help="a source tree to run the same command from (older code)")
    args = parser.parse_args()

    params, f32_bytes, dtypes = teacher_float32_bytes(args.teacher)
    result = {
        "teacher": args.teacher,
        "teacher_parameters": params,
        "teacher_stored_dtypes": sorted(dtypes),
        "teacher_float32_MiB": round(f32_bytes / 2**20, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        init = [sys.executable, "-m", "pipeline.cli", "student", "init", "--from", args.teacher]
        init += ["--layers", str(args.layers), "--output"]
        result["command"] = " ".join([*init[1:], "DIR"])
        result["floor_MiB"] = round(child_peak_mib([sys.executable, "-c", FLOOR, args.teacher], REPO), 1)
        result["ours_MiB"] = round(child_peak_mib([*init, f"{tmp}/ours"], REPO), 1)
        if args.compare_tree:
            result["compare_tree_MiB"] = round(child_peak_mib([*init, f"{tmp}/theirs"], args.compare_tree), 1)
            ours, theirs = Path(tmp, "ours"), Path(tmp, "theirs")
            names = sorted(p.name for p in ours.iterdir())
            result["identical_files"] = {
                name: (theirs / name).exists() and (ours / name).read_bytes() == (theirs / name).read_bytes()
                for name in names
            }
    result["ours_below_teacher_float32"] = result["ours_MiB"] < result["teacher_float32_MiB"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
