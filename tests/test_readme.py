"""README's "Use it" snippet, run as written (8 fake devices), with its comments checked as claims.

Two edits: its placeholder checkpoint folder becomes a folder the test writes first from the snippet's own
plain model, so the Hugging Face lines load real weights; the MoE line's `logits` is renamed so that the sharded
logits before it can be checked.
"""

import dataclasses
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = 'src = "path/to/Llama-Mistral-Qwen-Gemma-or-Mixtral-folder"'


def _snippet() -> str:
    m = re.search(r"^## Use it\n.*?^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert m, "README.md lost its '## Use it' python block"
    return m.group(1)


def test_readme_snippet_runs_and_its_comments_hold(tmp_path):
    code = _snippet()
    assert PLACEHOLDER in code and '"out/"' in code, "README's HF lines changed: update this test's substitution"
    src, out = tmp_path / "src", tmp_path / "out"
    code = code.replace(PLACEHOLDER, f"plain = model; src = {str(src)!r}; hf.save_pretrained(plain, src)"
                        ).replace('"out/"', repr(str(out)))
    assert "logits, aux = " in code
    code = code.replace("logits, aux = ", "moe_logits, aux = ")  # keep the sharded logits for the check below
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README is ours

    cfg, plain, model = ns["cfg"], ns["plain"], ns["model"]
    want = jax.tree.leaves(nnx.state(plain, nnx.Param))
    assert cfg.param_count() == sum(x.size for x in want)  # "the config does its own accounting"

    tokens = jnp.zeros((8, 16), jnp.int32)
    ref = plain(tokens)
    assert ref.shape == (8, 16, cfg.vocab_size) and ref.dtype == jnp.float32  # "[B, T, V] float32"
    hs = ns["hs"]  # "[L + 1, B, T, D]", the last entry the one the LM head reads
    assert hs.shape == (cfg.n_layers + 1, 2, 16, cfg.d_model)
    np.testing.assert_array_equal(plain.unembed(hs[-1]), plain(jnp.zeros((2, 16), jnp.int32)))
    # bf16 compute: within the stated bf16 tolerance of test_transformer.py, 5% of the logit scale
    tol = 0.05 * float(jnp.abs(ref).max())
    # the sharded model is the plain one: same seed, so the same weights and the same logits
    sharded = ns["logits"]
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref), atol=tol, rtol=0)

    # forward mode through the model under plain_autodiff; without it, JAX's jvp-of-custom_vjp TypeError
    assert np.isfinite(float(ns["slope"])) and ns["slope"].shape == ()
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(lambda p: nnx.merge(ns["g"], p)(tokens).mean(), (ns["p"],), (ns["p"],))

    assert ns["tokens"].shape == (1, 4 + 16) and jnp.issubdtype(ns["tokens"].dtype, jnp.integer)
    # "each row as alone (exactly in float32, bf16 rounds per batch)": the snippet's bf16 model gives the shape and
    # keeps the padded prompt; the claim itself on the same weights computing in float32
    padded, batch = np.asarray(ns["padded"]), np.asarray(ns["batch"])
    assert padded.shape == (2, 3 + 16) and np.array_equal(padded[:, :3], batch) and batch[1, 0] == 0
    make = ns["Transformer"]
    f32 = nnx.merge(nnx.split(nnx.eval_shape(lambda: make(dataclasses.replace(cfg, dtype="float32"),
                                                          rngs=nnx.Rngs(0))))[0], nnx.state(plain))
    both = np.asarray(ns["generate"](f32, ns["batch"], max_new_tokens=16, prompt_mask=ns["mask"]))
    alone = np.asarray(ns["generate"](f32, jnp.array([[7]]), max_new_tokens=16))  # the padded row
    assert np.array_equal(both[1, 3:], alone[0, 1:])

    aux, moe_cfg = ns["aux"], ns["moe_cfg"]
    assert set(aux) == {"lb_loss", "z_loss", "dropped_frac", "load"}
    assert aux["load"].shape == (moe_cfg.n_layers // moe_cfg.moe_every, moe_cfg.moe.n_experts)  # [L_moe, E]

    # save -> load keeps the weights exactly, and both HF folders give the plain model's logits
    for loaded in (model, ns["hf"].from_pretrained(str(out))):
        got = jax.tree.leaves(nnx.state(loaded, nnx.Param))
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(ref), atol=tol, rtol=0)


# cited in docs/benchmarks.md as removed (its sentence says so), not as a test to run
REMOVED_TESTS = {"test_a_looped_layer_stack_takes_plain_products_and_an_unrolled_one_the_transposed_gradient"}


def test_the_tests_the_docs_cite_exist():
    """Every test name README.md and docs/*.md point a reader to is defined in tests/ (a name ending in '_' is a prefix:
    `test_scaling_*.py`, `test_sequence_parallel_dispatch_...`): merging or renaming tests left dead names behind."""
    tests = README.parent / "tests"
    names = {f.stem for f in tests.glob("test_*.py")}
    names |= {n for f in tests.glob("test_*.py") for n in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    cited = {(n, d.name) for d in docs for n in re.findall(r"\btest_\w+", d.read_text())}
    dead = sorted((n, doc) for n, doc in cited if n not in REMOVED_TESTS
                  and not (any(m.startswith(n) for m in names) if n.endswith("_") else n in names))
    assert not dead, f"docs cite tests that do not exist (renamed or merged?): {dead}"


def test_the_snippet_asks_for_the_devices_its_mesh_needs():
    """Run as written in a fresh CPU process, the snippet's 8-device mesh failed at make_mesh ('needs 8 devices but 1
    are available'): jax gives one CPU device unless asked, before the backend starts, as docs/parallelism.md says."""
    code = _snippet()
    sizes = re.search(r"make_mesh\(\{([^}]*)\}\)", code)
    assert sizes, "README's snippet no longer builds a mesh with make_mesh: update this test"
    need = int(np.prod([int(v) for v in re.findall(r":\s*(\d+)", sizes.group(1))]))
    asked = re.search(r'^jax\.config\.update\("jax_num_cpu_devices", (\d+)\)', code, re.M)
    assert asked and int(asked.group(1)) == need and asked.start() < code.index("nnx.Rngs"), (
        f"the snippet's mesh needs {need} devices: set jax_num_cpu_devices to it before anything touches JAX")


def test_testing_doc_quotes_make_tests_pytest_command():
    """docs/testing.md quotes the pytest line `make test` runs; its flags drifted from the Makefile's."""
    make = (README.parent / "Makefile").read_text()
    cmd = re.search(r"-m (pytest [^$\n]*?tests)\b", make)
    assert cmd, "Makefile's test target lost its pytest line: update this test"
    quoted = cmd.group(1).replace("pytest -q ", "pytest ")
    assert f"`{quoted}`" in (README.parent / "docs" / "testing.md").read_text(), quoted


def test_the_sdist_carries_what_its_suite_needs(tmp_path):
    """The sdist held tests/test_*.py alone (setuptools' default): no conftest.py (the 8 fake devices), multihost
    helpers or no-torch stub, nor the docs, benchmarks and Makefile the tests read. Built by the PEP 517 hook from a
    copy of this tree, it now holds every one of those files."""
    src = tmp_path / "src"
    shutil.copytree(README.parent, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".whl", ".gl", "runs", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]", ".*_cache"))
    hook = "from setuptools import build_meta; build_meta.build_sdist('dist')"
    subprocess.run([sys.executable, "-c", hook], cwd=src, check=True, capture_output=True, timeout=300)
    (sdist,) = (src / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:  # names under the sdist's one top folder, jaxscale-<version>/
        shipped = {pathlib.PurePosixPath(*pathlib.PurePosixPath(n).parts[1:]).as_posix() for n in tar.getnames()}
    need = {p.relative_to(src).as_posix() for d in ("tests", "docs", "benchmarks") for p in (src / d).rglob("*")
            if p.is_file()}
    need |= {"README.md", "pyproject.toml", "Makefile", "requirements.lock", "requirements-torch.lock"}
    missing = sorted(need - shipped)
    assert not missing, f"the sdist lacks {len(missing)} files its suite needs (MANIFEST.in): {missing[:10]}"
