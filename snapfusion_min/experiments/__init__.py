"""The paper's experiments at toy scale: ``budget`` (steps and sample counts),
``stages`` (the recipe's stages in order, each a package call), ``recipe`` (run them, then the report), ``report``
(report/README.md: Table 1, Figs. 2, 5, 6, 8, the goal), ``distillation_claims`` (Table 2, Figs. 4, 6b-d at 8 steps:
the students of several seeds and the paper's claims, report/distillation.md), ``alg1_baselines`` (Alg. 1 against
random removals, dCLIP alone, uniform channel slimming and training from scratch: report/evolving.md) and
``channel_slimming`` (that uniform slimming). Every stage at SD-v1.5's size, run through the commands, is
``cli/sd15_smoke.py``."""
