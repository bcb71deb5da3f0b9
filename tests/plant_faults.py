"""Plant, one at a time, the wiring faults a reviewer would try in ``snapfusion_min/distill.py`` (and the faults an
audit found in the distillation claims' statistics, ``experiments/distillation_claims.py``) and check that their
tests fail for each (issue: proofs that can fail). ``make mutate`` runs it before mutmut.

    python tests/plant_faults.py        # prints 'caught' or 'MISSED' per fault; exit status 1 if any is missed
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTILL = [  # (fault, code as it is, code with the fault)
    ("the teacher takes one DDIM step instead of k", "z_t2 = teacher_z(teacher, z_t, points,",
     "z_t2 = teacher_z(teacher, z_t, [points[0], points[-1]],"),
    ("no SNR weight", "loss = (D.expand(snr_weight(alpha_t, sigma_t), per_sample) * per_sample).mean()",
     "loss = per_sample.mean()"),
    ("Eq. 11's coin inverted", "torch.rand(()) < cfg.cfg_prob", "torch.rand(()) >= cfg.cfg_prob"),
    ("w ~ U[0, 1]", "w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(", "w = torch.rand("),
    ("dynamic gamma not detached", 'cfg.gamma * dstl["loss"].detach() / ori["loss"].detach()',
     'cfg.gamma * dstl["loss"] / ori["loss"]'),
    ("student and teacher start from different timesteps", "else guided_v(student, z_t, t, context",
     "else guided_v(student, z_t, points[1], context"),
    ("x_target's sigma ratio inverted", "torch.as_tensor(sigma_t2) / torch.as_tensor(sigma_t)",
     "torch.as_tensor(sigma_t) / torch.as_tensor(sigma_t2).clamp(min=1e-3)"),
    ("guidance with cond and uncond swapped", "return D.cfg(v_cond, v_uncond, w)", "return D.cfg(v_uncond, v_cond, w)"),
    ("the student unguided in the CFG loss", "guided_v(student, z_t, t, context, uncond, w)",
     "guided_v(student, z_t, t, context, uncond, None)"),
    ("the w-conditioned student not told w", "student(z_t, t, context, w=w) if", "student(z_t, t, context) if"),
    ("L_ori at one fixed t and no noise", "t = torch.randint(0, schedule.steps, (x0.shape[0],), device=x0.device)\n"
     "    eps = torch.randn_like(x0)", "t = torch.full((x0.shape[0],), 999, device=x0.device)\n"
     "    eps = torch.zeros_like(x0)"),
    ("one w for the whole batch", "torch.rand(x0.shape[0], device=x0.device)",
     "torch.rand((), device=x0.device).expand(x0.shape[0])"),
    ("L_ori without the text", "v = student(D.noisy(x=x0, eps=eps, alpha=alpha, sigma=sigma), t, context)",
     "v = student(D.noisy(x=x0, eps=eps, alpha=alpha, sigma=sigma), t, 0 * context)"),
]
CLAIMS = [
    ("a tie counts as keeping", 'found = "holds" if bootstrap.keeps_quality(a, b, c.metric, margin) else "not shown"',
     'found = "holds" if bootstrap.verdict(gains) != "worse" else "not shown"'),
    ("the direction from the estimate", '[bootstrap.verdict(gains)]',
     '[bootstrap.verdict(gains) if bootstrap.verdict(gains) == "tie" else "better" if gains[0] > 0 else "worse"]'),
    ("seed 0 alone", "runs[name] = {w: [s[w] for s in seeds] for w in grid}",
     "runs[name] = {w: [seeds[0][w]] for w in grid}"),
    ("the baseline over a smaller grid", 'f"/{key(w)}"]] for w in b.judge.guidance}',
     'f"/{key(w)}"]] for w in b.judge.guidance[:-1 if name == "base" else None]}'),
]
FAULTS = {("distill.py", "test_distill.py"): DISTILL,
          ("experiments/distillation_claims.py", "test_distillation_claims.py"): CLAIMS}


def main() -> int:
    missed = 0
    for (target, test), faults in FAULTS.items():
        missed += plant(ROOT / "snapfusion_min" / target, f"tests/{test}", faults)
    return int(missed > 0)


def plant(target: Path, test: str, faults: list[tuple[str, str, str]]) -> int:
    """Each fault in ``target`` in turn, ``test`` run on it; returns how many it missed."""
    original = target.read_text()
    missed = 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed (make interrupted): the finally still restores
    try:
        for fault, code, faulty in faults:
            if code not in original:
                raise SystemExit(f"plant_faults.py: the code of fault {fault!r} is no longer in {target.name}; "
                                 "update it")
            target.write_text(original.replace(code, faulty, 1))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                               capture_output=True, cwd=ROOT)
            missed += r.returncode == 0
            print(f"{'caught' if r.returncode else 'MISSED'}  {fault}", flush=True)
    finally:
        target.write_text(original)
    return missed


if __name__ == "__main__":
    sys.exit(main())
