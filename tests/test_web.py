"""web/sampler.js, the browser page's sampler, run by node against the Python it mirrors: the same token ids as
text_encoder.Tokenizer for 200 prompts (the world's captions and prompts nobody's vocabulary expects), the same
numbers from the seeded generator (export/web.py; to the last bit of float32), the same timestep grids, and DDIM +
CFG steps equal to diffusion.Solver's on v- and eps-prediction. Skipped, with the reason, where node is not installed.
"""

import json
import shutil
import subprocess

import pytest
import torch
from helpers import ROOT

from snapfusion_min import diffusion as D
from snapfusion_min.export.web import portable_noise
from snapfusion_min.text_encoder import EOT, SOT, Tokenizer, write_bpe_files
from snapfusion_min.world import draw

NODE = shutil.which("node")
if NODE is None:  # one line in make test's summary, for the whole file
    pytest.skip("node is not installed: the browser page's JavaScript is untested", allow_module_level=True)

ODD = ["", "   ", "A LARGE Red   circle", "two green squares on a dark background!!!", "don't won't I'm we'll they'd",
       "caf\u00e9 na\u00efve \u00fcber stra\u00dfe", "cafe\u0301 (decomposed)",
       "&amp; &lt;b&gt; &#39;quoted&#39; &#x41;",
       "<start_of_text> inside <end_of_text> the text", "12345 3.14 1,000", "\u6f22\u5b57 \u3072\u3089\u304c\u306a",
       "emoji \U0001f600\U0001f680 and symbols \u00a9\u00ae\u2122", "tab\tand\nnew line", "a " * 60 + "end",
       "hyphen-ated words_and_underscores", "#hashtag @mention http://example.com/x?y=1"]


def run_js(script: str, payload: object) -> object:
    """Run ``script`` (an ES module importing web/sampler.js as ``S``) with ``payload`` on stdin, its printed JSON."""
    code = f"import * as S from {json.dumps((ROOT / 'web' / 'sampler.js').as_uri())};\n" \
           "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n" + script
    r = subprocess.run([NODE, "--input-type=module", "-e", code.replace("require('fs')", "(await import('fs'))")],
                       input=json.dumps(payload), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def prompts() -> list[str]:
    captions = [draw(0, split, i)[1].caption for split in ("train", "heldout") for i in range(92)]
    return captions + ODD


def test_tokenizer_gives_pythons_ids_for_200_prompts(tmp_path):
    write_bpe_files(tmp_path)
    texts = prompts()
    assert len(texts) == 200
    got = run_js("""
        const fs = await import('fs');
        const tok = new S.Tokenizer(JSON.parse(fs.readFileSync(input.dir + '/vocab.json', 'utf8')),
                                    fs.readFileSync(input.dir + '/merges.txt', 'utf8'), input.settings);
        console.log(JSON.stringify(input.prompts.map((p) => Array.from(tok.call(p)))));
    """, {"dir": str(tmp_path), "prompts": texts, "settings": {"context_length": 77, "sot": SOT, "eot": EOT}})
    want = Tokenizer(77)(texts).tolist()
    wrong = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not wrong, wrong[:3]


def test_seeded_noise_is_the_same_numbers_in_both():
    cases = [(0, 16), (1, 1024), (4294967295, 7), (123456789, 4 * 16 * 16)]
    got = run_js("console.log(JSON.stringify(input.map(([s, n]) => Array.from(S.portableNoise(s, n)))));", cases)
    for (seed, n), g in zip(cases, got):
        want = portable_noise(seed, (n,))  # V8's log / cos and C's may differ in the last bit of a float64
        torch.testing.assert_close(torch.tensor(g, dtype=torch.float32), want, rtol=1e-6, atol=1e-6)
    big = portable_noise(123456789, (4 * 16 * 16,))
    assert abs(big.mean()) < 0.1 and abs(big.std() - 1) < 0.1  # it is N(0, 1)-like
    assert not torch.equal(portable_noise(1, (16,)), portable_noise(2, (16,)))


def test_grids_and_ddim_cfg_steps_equal_the_solvers():
    schedule = D.Schedule()
    cases = [(steps, spacing) for steps in (1, 2, 3, 7, 8, 16, 20, 50) for spacing in D.SPACINGS]
    z, cond, uncond = (torch.randn(2 * 4 * 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    got = run_js("""
        const abar = input.abar, out = {grids: [], steps: []};
        for (const [n, spacing] of input.cases) out.grids.push(S.timesteps(n, spacing));
        for (const prediction of ['v', 'eps']) {
          const grid = S.timesteps(4, 'trailing');
          let z = Float32Array.from(input.z);
          const guided = S.guide(Float32Array.from([...input.uncond, ...input.cond]), 4.5);
          for (let i = 0; i < grid.length - 1; i++) [z] = S.ddimStep(z, guided, grid[i], grid[i + 1], abar, prediction);
          out.steps.push(Array.from(z));
        }
        console.log(JSON.stringify(out));
    """, {"cases": cases, "abar": schedule.alphas_cumprod.tolist(), "z": z.tolist(), "cond": cond.tolist(),
          "uncond": uncond.tolist()})
    assert got["grids"] == [D.timesteps(n, s) for n, s in cases]
    for prediction, js in zip(("v", "eps"), got["steps"]):
        grid = D.timesteps(4, "trailing")
        solver, x = D.Solver("ddim", grid, schedule, prediction), z.clone()
        for i in range(len(grid) - 1):
            x = solver.step(i, x, D.cfg(cond, uncond, 4.5))
        torch.testing.assert_close(torch.tensor(js), x, rtol=1e-5, atol=1e-5)
