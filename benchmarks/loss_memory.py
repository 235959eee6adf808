"""Peak memory of loss + backward, the full-logits loss against the chunked one (issue 14, acceptance 1).

    .venv/bin/python benchmarks/loss_memory.py                      # V 152,064, H 1536, N 1k/2k/4k, ours at 32k
    .venv/bin/python benchmarks/loss_memory.py --hidden 128 --check-hidden 1536 --check 1024

Synthetic CPU tensors: student hidden states [N, H] and lm_head weight [V, H] (float32, both requiring grad), labels,
uneven token weights; for KD a dense teacher of the same shapes (no grad), alpha 0.5, T 2. "full" is
`distillation_loss(hidden @ W.T, teacher_hidden @ Wt.T, ...)` with autograd, "ours" `chunked_distillation_loss`
with its default chunk. Each case runs in a fresh subprocess so allocator caches and peaks do not carry over: the
child builds its inputs in place (no temporaries), runs a tiny no-grad matmul so the BLAS threads and buffers exist,
reads its peak RSS (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) as the baseline, runs loss + backward, reads the
peak again; the table's "loss" column is the difference. Both paths also produce the [V, H] weight gradient
(V*H*4 bytes, 0.93 GB at H 1536), which any loss produces and a training step keeps; "own" is the peak without it.
A full case whose predicted need exceeds the machine's available memory is skipped with the reason.

Compute grows with H (every matmul is N x H x V) while the logits' memory does not: `--hidden 128` gives the same
logits-bound figures in a twelfth of the time on a busy 2-core machine (the [V, H] and [N, H] terms shrink and are
printed). `--check N` compares loss, ce, kd and both gradients of the two paths in one process (1e-4 relative).
Memory figures do not depend on machine load; the seconds printed do.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sft.losses import DenseTeacher, chunked_distillation_loss, distillation_loss  # noqa: E402

ALPHA, TEMPERATURE = 0.5, 2.0
MIB = 2**20


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _inputs(loss: str, n: int, vocab: int, hidden: int, seed: int = 0):
    """Built in place (empty + normal_), so building them leaves no temporary in the peak."""
    torch.manual_seed(seed)
    h = torch.empty(n, hidden).normal_().requires_grad_()
    w = torch.empty(vocab, hidden).normal_(std=hidden**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (n,))
    weights = torch.rand(n) * 2
    teacher = None
    if loss == "kd":
        teacher = DenseTeacher(torch.empty(n, hidden).normal_(), torch.empty(vocab, hidden).normal_(std=hidden**-0.5))
    return h, w, labels, weights, teacher


def _run(impl: str, h, w, labels, weights, teacher, total):
    if impl == "ours":
        return chunked_distillation_loss(h, w, labels, weights, ALPHA, TEMPERATURE, total, teacher)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher.hidden @ teacher.weight.T
    return distillation_loss(h @ w.T, teacher_logits, labels, weights, ALPHA, TEMPERATURE, total)


def child(loss: str, impl: str, n: int, vocab: int, hidden: int) -> dict:
    h, w, labels, weights, teacher = _inputs(loss, n, vocab, hidden)
    with torch.no_grad():
        (h[:8] @ w.T).sum()
    baseline = _peak_bytes()
    start = time.perf_counter()
    out = _run(impl, h, w, labels, weights, teacher, weights.sum() * 1.5)
    out[0].backward()
    seconds = time.perf_counter() - start
    return {"peak": _peak_bytes(), "baseline": baseline, "seconds": seconds, "loss": out[0].item()}


def check(n: int, vocab: int, hidden: int) -> dict:
    """Both paths on the same inputs (KD, so loss, ce and kd all exist): the largest relative differences."""
    h, w, labels, weights, teacher = _inputs("kd", n, vocab, hidden)
    total = weights.sum() * 1.5
    results = {}
    for impl in ("full", "ours"):
        h.grad = w.grad = None
        out = _run(impl, h, w, labels, weights, teacher, total)
        out[0].backward()
        results[impl] = ([t.item() for t in out], h.grad.clone(), w.grad.clone())
    (fv, fh, fw), (ov, oh, ow) = results["full"], results["ours"]
    rel = {name: abs(a - b) / abs(b) for name, a, b in zip(("loss", "ce", "kd"), ov, fv, strict=True)}
    rel["grad_hidden"] = ((oh - fh).norm() / fh.norm()).item()
    rel["grad_weight"] = ((ow - fw).norm() / fw.norm()).item()
    return rel


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _full_need(loss: str, n: int, vocab: int, hidden: int) -> int:
    """[N, V] float32 tensors alive at the peak, as measured (1k-4k, V 152,064): 3 for CE, 7.6 for KD, plus the
    [V, H] gradient."""
    return int((7.6 if loss == "kd" else 3) * n * vocab * 4) + vocab * hidden * 4


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096])
    ap.add_argument("--ours-only", type=int, nargs="*", default=[32768])
    ap.add_argument("--losses", nargs="*", default=["ce", "kd"], choices=["ce", "kd"])
    ap.add_argument("--check", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--check-hidden", type=int, default=None, help="hidden size of the checks (default --hidden)")
    ap.add_argument("--child", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--check-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], int(a.child[2]), a.vocab, a.hidden)))
        return
    if a.check_child:
        print(json.dumps(check(a.check_child, a.vocab, a.hidden)))
        return

    grad_w = a.vocab * a.hidden * 4
    print(f"V={a.vocab} H={a.hidden}: the [V, H] float32 weight gradient is {grad_w / MIB:.0f} MiB in both paths")
    print(f"{'loss':4} {'N':>6} {'impl':4} {'loss MiB':>9} {'own MiB':>8} {'seconds':>8}  note")
    table: dict[tuple[str, int, str], float] = {}
    for loss in a.losses:
        for n in sorted(set(a.sizes) | set(a.ours_only)):
            for impl in ("full", "ours"):
                if impl == "full" and n not in a.sizes:
                    continue
                need = _full_need(loss, n, a.vocab, a.hidden)
                if impl == "full" and need > 0.9 * _available_bytes():
                    print(
                        f"{loss:4} {n:6} full skipped: needs about {need / 2**30:.1f} GiB, "
                        f"{_available_bytes() / 2**30:.1f} GiB available"
                    )
                    continue
                r = _spawn(["--vocab", str(a.vocab), "--hidden", str(a.hidden), "--child", loss, impl, str(n)])
                if "error" in r:
                    print(f"{loss:4} {n:6} {impl:4} failed: {r['error']}")
                    continue
                delta = r["peak"] - r["baseline"]
                table[loss, n, impl] = delta
                print(
                    f"{loss:4} {n:6} {impl:4} {delta / MIB:9.0f} {(delta - grad_w) / MIB:8.0f} {r['seconds']:8.1f}"
                    f"  loss={r['loss']:.6f}",
                    flush=True,
                )
    for loss in a.losses:
        for n in a.sizes:
            if (loss, n, "full") in table and (loss, n, "ours") in table:
                full, ours = table[loss, n, "full"], table[loss, n, "ours"]
                print(
                    f"ours/full {loss} N={n}: {ours / full:.3f} with the weight gradient, "
                    f"{(ours - grad_w) / (full - grad_w):.3f} without"
                )
    hidden = a.check_hidden or a.hidden
    for n in a.check:
        if _full_need("kd", n, a.vocab, hidden) * 1.5 > _available_bytes():
            print(f"check N={n} skipped: both paths in one process need more than the available memory")
            continue
        r = _spawn(["--vocab", str(a.vocab), "--hidden", str(hidden), "--check-child", str(n)])
        ok = "error" not in r and max(r.values()) < 1e-4
        print(f"check KD N={n} H={hidden}: {json.dumps(r)} -> {'within 1e-4' if ok else 'FAILED'}", flush=True)


if __name__ == "__main__":
    main()
