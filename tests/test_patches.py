"""The upstream-ready diffs in ``patches/`` against the installed host libraries.

For each host (mlx-lm always; mlx-vlm when it is installed) the installed
package is copied to a temporary directory and its diffs are applied there in
sequence, the way ``patches/README.md`` tells a maintainer to.  The tests
check that

- every diff still applies (a failure names the diff and the host: the host
  version moved away from the one the diffs were made against);
- every file a diff touches still compiles;
- every host attribute the runtime hook replaces (the patchers named in
  ``mlx_lm_dspark._hook.HOST_PATCHES``, read from their source) has a diff
  that changes the host code making that hook unnecessary, as ``COVERAGE``
  records; removing a diff, or a diff no longer changing what it claims, fails;
- altering a line of the pristine host that a diff relies on makes the apply
  check fail (the check has teeth).
"""

import ast
import importlib.metadata
import importlib.util
import os
import py_compile
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mlx_lm_dspark import _hook
from mlx_lm_dspark.hosts.guards import release

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"

# patches/ subdirectory -> (import package, host version the diffs were made against)
HOSTS = {
    "mlx-lm": ("mlx_lm", "0.32.2"),
    "mlx-vlm": ("mlx_vlm", "0.7.10"),
}

# Hooked host module (a key of HOST_PATCHES) -> host attribute its patcher
# replaces -> (the diff making that unnecessary, {host file: [functions or
# classes the diff must change there]}), or a list of them where the hook
# replaces the attribute for more than one reason.  Paths are relative to
# site-packages.
COVERAGE = {
    "mlx_lm.utils": {
        "load_model": ("0002-load-registered-drafters.diff", {"mlx_lm/utils.py": ["load_model"]}),
        "load_tokenizer": ("0002-load-registered-drafters.diff", {"mlx_lm/utils.py": ["load_tokenizer"]}),
        # a drafter-free --draft-model value (n-gram lookup) is not downloaded
        "_download": ("0009-download-skips-fileless-drafters.diff", {"mlx_lm/utils.py": ["_download"]}),
    },
    "mlx_lm.sample_utils": {
        "make_sampler": ("0005-sampler-settings.diff", {"mlx_lm/sample_utils.py": ["make_sampler"]}),
    },
    "mlx_lm.generate": {
        "speculative_generate_step": (
            "0003-generate-draft-kinds.diff",
            {"mlx_lm/generate.py": ["speculative_generate_step"]},
        ),
        "setup_arg_parser": ("0003-generate-draft-kinds.diff", {"mlx_lm/generate.py": ["setup_arg_parser"]}),
        "generate": ("0003-generate-draft-kinds.diff", {"mlx_lm/generate.py": ["generate"]}),
        # our user errors as one line: the host prints its kinds' errors with parser.error
        "main": ("0003-generate-draft-kinds.diff", {"mlx_lm/generate.py": ["main"]}),
        # max_kv_size kept for registered kinds: the rotating cache generate_step builds
        "stream_generate": ("0008-stream-generate-max-kv-size.diff", {"mlx_lm/generate.py": ["stream_generate"]}),
    },
    "mlx_lm.server": {
        # patch_server swaps the module's argparse to add the drafter options
        "argparse": ("0004-server-draft-kinds.diff", {"mlx_lm/server.py": ["main"]}),
        # one-line start-up errors; loading (and preparing) a drafter at start-up
        "main": ("0004-server-draft-kinds.diff", {"mlx_lm/server.py": ["main", "ModelProvider.__init__"]}),
        "_serve_single": (
            "0004-server-draft-kinds.diff",
            {"mlx_lm/server.py": ["ResponseGenerator._serve_single"]},
        ),
        "generate": [
            # the hook remembers the request context; the host carries the statistics in it
            ("0004-server-draft-kinds.diff",
             {"mlx_lm/server.py": ["GenerationContext", "APIHandler.handle_completion"]}),
            # the hook watches the client's socket while the request generates
            ("0012-server-stops-for-disconnected-clients.diff",
             {"mlx_lm/server.py": ["APIHandler.handle_completion", "APIHandler._client_disconnected"]}),
            # a generation that raises after the answer began is answered with the error
            ("0015-server-generation-errors.diff",
             {"mlx_lm/server.py": ["APIHandler.handle_completion", "APIHandler._answer_generation_error"]}),
        ],
        "validate_model_parameters": (
            "0004-server-draft-kinds.diff",
            {"mlx_lm/server.py": ["APIHandler.validate_model_parameters"]},
        ),
        "generate_response": (
            "0004-server-draft-kinds.diff",
            {"mlx_lm/server.py": ["APIHandler.generate_response"]},
        ),
        "completion_usage_response": (
            "0004-server-draft-kinds.diff",
            {"mlx_lm/server.py": ["APIHandler.completion_usage_response"]},
        ),
        "do_POST": [
            # a body that is not UTF-8 answered 400, like one that is not JSON
            ("0010-server-request-limits.diff", {"mlx_lm/server.py": ["APIHandler.do_POST"]}),
            # a client that disconnected ends its request quietly
            ("0012-server-stops-for-disconnected-clients.diff", {"mlx_lm/server.py": ["APIHandler.handle_completion"]}),
            # the error of a failed generation answered (500, or an event ending the stream)
            ("0015-server-generation-errors.diff", {"mlx_lm/server.py": ["APIHandler.handle_completion"]}),
        ],
        "_run_http_server": [
            # a listen backlog that takes a burst of clients
            ("0010-server-request-limits.diff", {"mlx_lm/server.py": ["ThreadingHTTPServer"]}),
            # SIGINT/SIGTERM stop the generation in flight and shut the server down
            ("0013-server-shuts-down-mid-generation.diff",
             {"mlx_lm/server.py": ["_run_http_server", "ResponseGenerator._serve_single"]}),
        ],
        # an exact prompt-cache hit leaves the last token to feed
        "fetch_nearest_cache": (
            "0011-prompt-cache-exact-hit.diff",
            {"mlx_lm/models/cache.py": ["LRUPromptCache.fetch_nearest_cache"]},
        ),
        # concurrent greedy requests with a drafter share batched rounds: the
        # host's batch loop builds the batch generator the draft kind supplies
        # for a pair the provider calls batchable, for the requests it admits
        "BatchGenerator": [
            ("0014-server-batched-draft-models.diff",
             {"mlx_lm/server.py": ["ModelProvider._load", "ResponseGenerator._is_batchable",
                                   "ResponseGenerator._generate"],
              "mlx_lm/draft_kinds.py": ["DraftKind", "draft_batch_generator"]}),
            # a batch step that raises ends its requests with the error; the loop goes on
            ("0015-server-generation-errors.diff", {"mlx_lm/server.py": ["ResponseGenerator._generate"]}),
        ],
        # the hook finds each batched request's context to attach its
        # statistics; the host copies them from the finished response
        "__init__": (
            "0014-server-batched-draft-models.diff",
            {"mlx_lm/server.py": ["ResponseGenerator._generate"],
             "mlx_lm/generate.py": ["GenerationBatch.Response"]},
        ),
    },
    "mlx_vlm.speculative.drafters": {
        "load_drafter": (
            "0001-drafter-kind-registry.diff",
            {"mlx_vlm/speculative/drafters/__init__.py": ["load_drafter"]},
        ),
        # patch_drafters also adds its kind to this set (a call, not an assignment)
        "KNOWN_DRAFTER_KINDS": (
            "0001-drafter-kind-registry.diff",
            {"mlx_vlm/speculative/drafters/__init__.py": ["register_drafter_kind", "drafter_kind_choices"]},
        ),
    },
    "mlx_vlm.generate.ar": {
        # bound in mlx_vlm.generate.ar, defined in mlx_vlm.speculative.utils
        "run_speculative_rounds": (
            "0003-dispatch-registered-rounds.diff",
            {"mlx_vlm/speculative/utils.py": ["run_speculative_rounds"]},
        ),
        "run_speculative_server_rounds": (
            "0003-dispatch-registered-rounds.diff",
            {"mlx_vlm/speculative/utils.py": ["run_speculative_server_rounds"]},
        ),
        # our drafters loaded by mlx_lm_dspark.load_drafter, met by mlx-vlm's prefill
        "SpeculativePrefill": (
            "0004-claim-external-drafters.diff",
            {"mlx_vlm/speculative/utils.py": ["SpeculativePrefill"],
             "mlx_vlm/speculative/drafters/__init__.py": ["external_drafter_kind"]},
        ),
    },
    "mlx_vlm.generate.dispatch": {
        "argparse": ("0002-draft-kind-choices.diff", {"mlx_vlm/generate/dispatch.py": ["parse_arguments"]}),
    },
    "mlx_vlm.server.cli": {
        "argparse": ("0002-draft-kind-choices.diff", {"mlx_vlm/server/cli.py": ["main"]}),
    },
}

# Diffs for integration points outside HOST_PATCHES.
OTHER_DIFFS = {
    # replaces the layer tapping of mlx_lm_dspark.target.tap
    "hidden-state capture": (
        "0006-hidden-state-capture.diff",
        {
            "mlx_lm/models/base.py": ["capture_hidden_states", "record_hidden_state"],
            "mlx_lm/models/qwen3.py": ["Qwen3Model.__call__"],
            "mlx_lm/models/gemma4_text.py": ["Gemma4TextModel.__call__"],
        },
    ),
    # defect 2 of /work/shared/docs/mlx-lm-integration-notes.md
    "Gemma-4 cache split": (
        "0007-fix-speculative-cache-split.diff",
        {"mlx_lm/generate.py": ["speculative_generate_step"]},
    ),
    "mlx-lm draft-kind registry": (
        "0001-draft-kind-registry.diff",
        {"mlx_lm/draft_kinds.py": ["DraftKind", "register_draft_kind", "draft_kind_of"]},
    ),
}


class DiffDoesNotApply(Exception):
    pass


def _rows(entry) -> list:
    """A COVERAGE entry's (diff, files) rows."""
    return entry if isinstance(entry, list) else [entry]


def _all_rows() -> list:
    """(hooked module or None, what, (diff, files)) of COVERAGE and OTHER_DIFFS."""
    rows = [(m, a, row) for m, table in COVERAGE.items() for a, entry in table.items() for row in _rows(entry)]
    return rows + [(None, what, row) for what, row in OTHER_DIFFS.items()]


def _host_of(path_or_module: str) -> str:
    package = re.split(r"[./]", path_or_module)[0]
    return next(host for host, (pkg, _) in HOSTS.items() if pkg == package)


def _package_dir(host: str) -> Path:
    spec = importlib.util.find_spec(HOSTS[host][0])
    return Path(list(spec.submodule_search_locations)[0])


def _require(host: str) -> None:
    if importlib.util.find_spec(HOSTS[host][0]) is not None:
        made_against, installed = HOSTS[host][1], _host_version(host)
        if (release(installed) or (0,)) < release(made_against):
            # An older release of the supported range: the diffs are for upstream's newest.
            pytest.skip(f"the {host} diffs are made against {host} {made_against}, newer than the "
                        f"installed {installed}.")
        return
    if host == "mlx-lm":
        pytest.fail("mlx-lm is not installed; it is a dependency of mlx-lm-dspark.")
    # find_spec, not importorskip: importing mlx_vlm takes seconds and is not needed.
    pytest.skip(f"{host} is not installed (an optional host); its diffs cannot be checked.")


def _diffs(host: str, patch_dir: Path = None):
    return sorted((patch_dir or PATCHES / host).glob("*.diff"))


def _touched_files(diff: Path):
    """(old path or None for a new file, new path) per file in a git-style diff."""
    files, old = [], None
    for line in diff.read_text().splitlines():
        if line.startswith("--- "):
            old = None if line == "--- /dev/null" else line[len("--- a/"):]
        elif line.startswith("+++ "):
            files.append((old, line[len("+++ b/"):]))
    return files


def _host_version(host: str) -> str:
    try:
        return importlib.metadata.version(host)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _run_apply(diff: Path, root: Path, check: bool):
    if shutil.which("git"):
        cmd = ["git", "apply", "--check", str(diff)] if check else ["git", "apply", str(diff)]
    else:
        cmd = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "-i", str(diff)]
        cmd += ["--dry-run"] if check else []
    # Keep git from discovering a repository above the temporary tree.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(root.parent))
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)


def apply_series(host: str, root: Path, patch_dir: Path = None) -> dict:
    """Apply ``host``'s diffs in order inside ``root`` (a copy of site-packages'
    view of the host).  Returns {diff name: {path: (text before, text after)}}."""
    changes = {}
    for diff in _diffs(host, patch_dir):
        paths = [new for _, new in _touched_files(diff)]
        before = {p: (root / p).read_text() if (root / p).exists() else None for p in paths}
        for check in (True, False):
            result = _run_apply(diff, root, check)
            if result.returncode != 0:
                raise DiffDoesNotApply(
                    f"patches/{host}/{diff.name} does not apply to the installed {host} "
                    f"{_host_version(host)} (made against {host} {HOSTS[host][1]}; the host "
                    f"version moved, so regenerate the diff): {(result.stderr or result.stdout).strip()}"
                )
        changes[diff.name] = {p: (before[p], (root / p).read_text()) for p in paths}
    return changes


def _copy_host(host: str, root: Path, only=None) -> Path:
    package = HOSTS[host][0]
    source = _package_dir(host)
    if only is None:
        shutil.copytree(source, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        for rel in only:
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.parent / rel, target)
    return root


@pytest.fixture(scope="module", params=sorted(HOSTS))
def applied(request, tmp_path_factory):
    """(host, patched copy, per-diff changes) with all of the host's diffs applied."""
    host = request.param
    _require(host)
    root = _copy_host(host, tmp_path_factory.mktemp(host) / "site-packages")
    try:
        changes = apply_series(host, root)
    except DiffDoesNotApply as e:
        pytest.fail(str(e))
    return host, root, changes


def test_diffs_apply_in_sequence(applied):
    host, _, changes = applied
    assert list(changes) == [d.name for d in _diffs(host)]
    assert changes, f"patches/{host} holds no diffs"


def test_patched_files_compile(applied, tmp_path):
    host, root, changes = applied
    for diff, files in changes.items():
        for path in files:
            try:
                py_compile.compile(str(root / path), cfile=str(tmp_path / "out.pyc"), doraise=True)
            except py_compile.PyCompileError as e:
                pytest.fail(f"patches/{host}/{diff} leaves {path} that does not compile: {e.msg}")


# ------------------------------------------------------------------ coverage


def _node(source: str, qualname: str):
    nodes = ast.parse(source).body
    found = None
    for part in qualname.split("."):
        found = next(
            (n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part),
            None,
        )
        if found is None:
            return None
        nodes = found.body
    return ast.dump(found)


def _rooted_in(node, aliases) -> bool:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return isinstance(node, ast.Name) and node.id in aliases


def _replaced_attributes(functions: dict, name: str, seen=None) -> set:
    """Attributes the patcher ``name`` assigns on its host module (its first
    parameter) or on objects taken from it, following helper functions the
    patcher hands the module to."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    func = functions[name]
    aliases = {func.args.args[0].arg}
    assigns = [n for n in ast.walk(func) if isinstance(n, ast.Assign)]
    grew = True
    while grew:
        grew = False
        for node in assigns:
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for t, v in zip(names, values):
                    if isinstance(t, ast.Name) and t.id not in aliases and _rooted_in(v, aliases):
                        aliases.add(t.id)
                        grew = True
    replaced = set()
    for node in assigns:
        for target in node.targets:
            if isinstance(target, ast.Attribute) and _rooted_in(target.value, aliases):
                if not target.attr.startswith("_mlx_lm_dspark"):
                    replaced.add(target.attr)
    for node in ast.walk(func):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in functions
            and node.args
            and _rooted_in(node.args[0], aliases)
        ):
            replaced |= _replaced_attributes(functions, node.func.id, seen)
    return replaced


def hooked_attributes() -> dict:
    """Host module -> attributes its runtime patcher replaces, from the source."""
    result = {}
    for module, target in _hook.HOST_PATCHES.items():
        patch_module, _, patcher = target.partition(":")
        source = REPO / (patch_module.replace(".", "/") + ".py")
        tree = ast.parse(source.read_text())
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        result[module] = _replaced_attributes(functions, patcher)
    return result


def coverage_problems(patch_dirs: dict) -> list:
    """What the diffs in ``patch_dirs`` ({host: directory}) fail to cover."""
    problems = []
    for module, attributes in hooked_attributes().items():
        if not attributes:
            problems.append(f"found no replaced attributes in the patcher of {module} (the check is broken)")
        missing = attributes - set(COVERAGE.get(module, {}))
        if missing:
            problems.append(f"{module}: the runtime hook replaces {sorted(missing)}, which no diff covers")
    for module, what, (diff, files) in _all_rows():
        host = _host_of(next(iter(files)))
        if not (patch_dirs[host] / diff).is_file():
            problems.append(f"{module or what} ({what}): patches/{host}/{diff} is missing")
            continue
        touched = {new for _, new in _touched_files(patch_dirs[host] / diff)}
        for path in set(files) - touched:
            problems.append(f"{what}: patches/{host}/{diff} does not touch {path}")
    return problems


def test_every_hooked_host_attribute_has_a_diff():
    assert set(COVERAGE) == set(_hook.HOST_PATCHES), "COVERAGE must list exactly the hooked modules"
    problems = coverage_problems({host: PATCHES / host for host in HOSTS})
    assert not problems, "\n".join(problems)


def test_every_diff_is_accounted_for_and_documented():
    claimed = {(_host_of(next(iter(files))), diff) for _, _, (diff, files) in _all_rows()}
    for host in HOSTS:
        readme = (PATCHES / host / "README.md").read_text()
        for diff in _diffs(host):
            assert (host, diff.name) in claimed, f"patches/{host}/{diff.name} is in no table of this test"
            assert diff.name in readme, f"patches/{host}/README.md does not describe {diff.name}"


def test_coverage_check_fails_when_a_diff_is_removed(tmp_path):
    dirs = {}
    for host in HOSTS:
        dirs[host] = tmp_path / host
        shutil.copytree(PATCHES / host, dirs[host])
    (dirs["mlx-lm"] / "0003-generate-draft-kinds.diff").unlink()
    problems = coverage_problems(dirs)
    assert any("0003-generate-draft-kinds.diff is missing" in p for p in problems), problems


def test_diffs_change_what_they_claim(applied):
    host, _, changes = applied
    for _, _, (diff, files) in _all_rows():
        if _host_of(next(iter(files))) != host:
            continue
        for path, qualnames in files.items():
            before, after = changes[diff][path]
            for qualname in qualnames:
                new = _node(after, qualname)
                assert new is not None, f"{diff} leaves no {qualname} in {path}"
                old = _node(before, qualname) if before is not None else None
                assert new != old, f"{diff} does not change {qualname} in {path}"


# ------------------------------------------------------------------ teeth


def _first_relied_on_line(host: str):
    """(diff, host file, 1-based line number) of the first pristine line a diff
    relies on (removed or context), in the first diff that edits an existing file."""
    for diff in _diffs(host):
        path, line_no = None, None
        for line in diff.read_text().splitlines():
            if line.startswith("--- "):
                path = None if line == "--- /dev/null" else line[len("--- a/"):]
            elif line.startswith("@@") and path is not None:
                line_no = int(re.match(r"@@ -(\d+)", line).group(1))
            elif line_no is not None and path is not None and line[:1] in (" ", "-"):
                if line[1:].strip():
                    return diff, path, line_no
                line_no += 1
    raise AssertionError(f"no diff in patches/{host} edits an existing file")


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_apply_check_fails_on_an_altered_host(host, tmp_path):
    _require(host)
    diff, path, line_no = _first_relied_on_line(host)
    created = {new for d in _diffs(host) for old, new in _touched_files(d) if old is None}
    existing = {old for d in _diffs(host) for old, _ in _touched_files(d) if old is not None} - created
    root = _copy_host(host, tmp_path / "site-packages", only=sorted(existing))
    lines = (root / path).read_text().splitlines(keepends=True)
    lines[line_no - 1] = lines[line_no - 1].rstrip("\n") + "  # changed upstream\n"
    (root / path).write_text("".join(lines))
    with pytest.raises(DiffDoesNotApply) as failure:
        apply_series(host, root)
    message = str(failure.value)
    assert f"patches/{host}/{diff.name}" in message and "host version moved" in message, message
