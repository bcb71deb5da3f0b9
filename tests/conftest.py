"""Test set-up: diffusers and transformers serve as reference oracles only, offline, built from configs.

Helpers live in ``helpers.py``; ``-m "not slow"`` (make test-fast) leaves out the full-size and end-to-end tests.
``make test`` runs two pytest-xdist workers, a test file at a time each (so a module's fixture is built once), then the
``full_size`` tests -- SD-v1.5's models, GBs each -- alone, one at a time.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# make test's pytest-xdist workers share the cores: each worker, and every script it starts, gets its part of them
# (set before torch starts its thread pool)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # torch may have started before the variable was set
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config: pytest.Config) -> None:
    # tests sample tiny models off their size on purpose; this filter is here, not in pyproject.toml, because naming
    # the class there imports the package, and with it numpy, before the thread share above is set
    config.addinivalue_line("filterwarnings", "ignore::snapfusion_min.pipeline.OutOfDomainWarning")


# The longest files first (docs/testing.md's slowest tests): --dist loadfile hands files to the two workers in the
# order collected, so a long file collected last would run alone at the end while the other worker idles.
LONGEST_FIRST = ("test_recipe.py", "test_coreml_ship.py", "test_shards.py", "test_metrics.py", "test_export.py",
                 "test_evolve.py", "test_cli.py", "test_sd_eval.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights of a sane scale, as a local weights file (95 MB, deleted)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    skeleton = fe.FeatureExtractorInceptionV3.__new__(fe.FeatureExtractorInceptionV3)
    with pytest.MonkeyPatch.context() as m:  # build the network without its download or a file
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(torch.nn.Module, "load_state_dict", lambda self, state, *a, **k: None)
        fe.FeatureExtractorInceptionV3.__init__(skeleton, "inception-v3-compat", ["2048"])
    state = {k: (torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * (2 / v[0].numel()) ** 0.5
                 if k.endswith("conv.weight") or k == "fc.weight" else v)
             for i, (k, v) in enumerate(skeleton.state_dict().items())}
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(state, path)
    yield path
    path.unlink()


@pytest.fixture(scope="session")
def random_inception(random_inception_file):
    """That file's network (``eval.metrics.inception``)."""
    from snapfusion_min.eval.metrics import inception

    return inception(random_inception_file)
