"""Shared pytest setup: 4 fake CPU devices, strict rank promotion, float64 opt-in per test, and
one persistent compilation cache for the session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Cache every compiled executable for the session, in the directory the CLI tests' runs use.

    Many tests build the same smoke-model step again (a resumed run, the CLI against the
    in-process run, several evaluations); with the cache a later build loads the binary instead
    of recompiling it (the resume test: ~40 % faster on 2 cores). The same program compiles to
    the same binary, so no result changes.
    """
    import _cli

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    prev = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(_cli.cache_dir(tmp_path_factory)))
    jax.config.update(keys[1], 0.0)
    jax.config.update(keys[2], 0)
    yield
    for k, v in prev.items():
        jax.config.update(k, v)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A simulated BIDS-PET cohort shared by the training tests (read it, never write into it):
    4 subjects × 2 slices of 16×16, image-domain noise, seed 0."""
    from kinetix.data.phantom import SimulationConfig
    from kinetix.data.phantom.cohort import simulate_cohort

    root = tmp_path_factory.mktemp("tiny_cohort")
    config = SimulationConfig(size=16, slices=2, noise="image")
    simulate_cohort(root, 4, 0, config, overwrite=True, progress=False)
    return root


@pytest.fixture
def unwritable_dir(tmp_path):
    """An empty directory in which this process cannot create anything.

    Mode 0o500; for root, who ignores modes, the immutable attribute (``chattr +i``, ext2/3/4,
    XFS, Btrfs). Skips, with the reason, where neither holds. Restored afterwards.
    """
    import shutil
    import subprocess

    path = tmp_path / "unwritable"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        undo = ["chmod", "700", str(path)]
    elif shutil.which("chattr") and not subprocess.run(["chattr", "+i", str(path)]).returncode:
        undo = ["chattr", "-i", str(path)]
    else:
        pytest.skip("running as root on a file system without chattr +i: nothing is unwritable")
    try:
        (path / ".probe").mkdir()
    except PermissionError:
        pass
    else:
        subprocess.run(undo, check=True)
        pytest.skip(f"{path} stays writable here (mode bits and attributes not enforced)")
    yield path
    subprocess.run(undo, check=True)


@pytest.fixture
def x64():
    """Run one test with float64 enabled (restored afterwards)."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests when no GPU is visible."""
    try:
        has_gpu = any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
