"""Loading bundles: every problem reported at once, each at its file and line; versions from content."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundles import TICKETS, make_bundle, request, write_bundle, write_text

from pdp.policy.catalog import Kind
from pdp.policy.decision import Outcome, Tier
from pdp.policy.engine import decide
from pdp.policy.loader import BundleError, load_bundle

BUNDLE = """
apiVersion: pdp/v1
kind: Bundle
name: acme
default_tier: ai_writable
default_effect: deny
"""

BUNDLE_WITH_APPROVAL = BUNDLE + "default_approval: {groups: [ops], min_approvals: 1, expires_in: 1h}\n"

TOOLS = """
apiVersion: pdp/v1
kind: Tools
tools:
  - name: tickets
    type: http
    resource_prefix: "http://127.0.0.1:8282/api/"
    operations: {GET: read, POST: write}
"""


def load_files(directory: Path, files: dict[str, str]) -> BundleError:
    for name, text in files.items():
        write_text(directory, name, text)
    with pytest.raises(BundleError) as excinfo:
        load_bundle(directory)
    return excinfo.value


@dataclass(frozen=True)
class Bad:
    id: str
    files: dict[str, str]
    # every problem expected, as (file, line, fragment of the message), in the reported order
    problems: list[tuple[str, int, str]]
    base: bool = True  # add bundle.yaml (with default_approval) and tools.yaml


RULE_HEAD = """
apiVersion: pdp/v1
kind: Rules
rules:
  - id: r1
    effect: allow
"""


def rules(when: str, *extra: str) -> str:
    """A Rules document whose only rule's `when` is on line 6 (extra lines follow it)."""
    return RULE_HEAD + f"    when: {when}\n" + "".join(f"    {line}\n" for line in extra)


BAD = [
    Bad("cel-syntax", {"rules.yaml": rules("'action.tool =='")}, [("rules.yaml", 6, "rule 'r1' when: ")]),
    Bad(
        "undefined-field",
        {"rules.yaml": rules("'action.resourse == \"x\"'")},
        [("rules.yaml", 6, "undefined field 'resourse'")],
    ),
    Bad(
        "double-vs-int",
        {"rules.yaml": rules("'action.estimated_cost_usd > 10'")},
        [("rules.yaml", 6, "no matching overload")],
    ),
    Bad("when-is-a-string", {"rules.yaml": rules("'\"yes\"'")}, [("rules.yaml", 6, "must be bool")]),
    Bad("when-is-an-int", {"rules.yaml": rules("'1 + 1'")}, [("rules.yaml", 6, "must be bool")]),
    Bad(
        "message-is-not-a-string",
        {"rules.yaml": rules("'true'", "message: '1 + 1'")},
        [("rules.yaml", 7, "must be string")],
    ),
    Bad(
        "undeclared-variable-name",
        {"rules.yaml": rules("'justification == \"x\"'")},
        [("rules.yaml", 6, "undeclared reference to 'justification'")],
    ),
    Bad(
        "duplicate-rule-id",
        {"rules.yaml": rules("'true'") + "  - id: r1\n    effect: deny\n    when: 'false'\n"},
        [("rules.yaml", 7, "duplicate rule id 'r1'")],
    ),
    Bad(
        "duplicate-rule-id-across-files",
        {"a.yaml": rules("'true'"), "b.yaml": rules("'false'")},
        [("b.yaml", 4, "duplicate rule id 'r1'")],
    ),
    Bad(
        "duplicate-boundary",
        {
            "boundaries.yaml": """
                apiVersion: pdp/v1
                kind: Boundaries
                boundaries:
                  - {name: iam, match: 'true', tier: human_only}
                  - {name: iam, match: 'false', tier: ai_writable}
            """
        },
        [("boundaries.yaml", 5, "duplicate boundary 'iam'")],
    ),
    Bad(
        "boundary-match-type-error",
        {
            "boundaries.yaml": """
                apiVersion: pdp/v1
                kind: Boundaries
                boundaries:
                  - name: iam
                    match: 'action.resource'
                    tier: human_only
            """
        },
        [("boundaries.yaml", 5, "boundary 'iam' match: expression must be bool")],
    ),
    Bad(
        "unknown-key-top-level",
        {"rules.yaml": RULE_HEAD.replace("rules:\n", "owner: sec\nrules:\n") + "    when: 'true'\n"},
        [("rules.yaml", 3, "Rules: owner: unknown key")],
    ),
    Bad(
        "unknown-key-in-rule",
        {"rules.yaml": rules("'true'", "priority: 1")},
        [("rules.yaml", 7, "Rules: rules.0.priority: unknown key")],
    ),
    Bad(
        "unknown-key-in-approval",
        {
            "rules.yaml": rules("'true'", "approval:", "  groups: [ops]", "  min_approval: 2").replace(
                "effect: allow", "effect: needs_approval"
            )
        },
        [("rules.yaml", 9, "rules.0.approval.min_approval: unknown key")],
    ),
    Bad(
        "unknown-key-in-bundle",
        {"bundle.yaml": BUNDLE + "owner: sec\n"},
        [("bundle.yaml", 6, "Bundle: owner: unknown key")],
        base=False,
    ),
    Bad(
        "missing-default-tier",
        {"bundle.yaml": BUNDLE.replace("default_tier: ai_writable\n", ""), "tools.yaml": TOOLS},
        [("bundle.yaml", 1, "default_tier")],
        base=False,
    ),
    Bad(
        "bad-default-tier",
        {"bundle.yaml": BUNDLE.replace("default_tier: ai_writable", "default_tier: sometimes"), "tools.yaml": TOOLS},
        [("bundle.yaml", 4, "default_tier")],
        base=False,
    ),
    Bad(
        "approval-required-default-tier-without-default-approval",
        {"bundle.yaml": BUNDLE.replace("default_tier: ai_writable", "default_tier: approval_required")},
        [("bundle.yaml", 4, "default_tier approval_required needs default_approval")],
        base=False,
    ),
    Bad("no-bundle-document", {"tools.yaml": TOOLS}, [("", 0, "no 'kind: Bundle' document")], base=False),
    Bad(
        "two-bundle-documents",
        {"bundle.yaml": BUNDLE_WITH_APPROVAL + "---\n" + BUNDLE.replace("acme", "other")},
        [("bundle.yaml", 9, "more than one 'kind: Bundle' document")],
        base=False,
    ),
    Bad(
        "two-bundle-files",
        {"a.yaml": BUNDLE, "z.yaml": BUNDLE},
        [("z.yaml", 1, "more than one 'kind: Bundle' document")],
        base=False,
    ),
    Bad(
        "unknown-kind",
        {"x.yaml": "apiVersion: pdp/v1\nkind: Policy\nrules: []\n"},
        [("x.yaml", 2, "unknown kind 'Policy'")],
    ),
    Bad("missing-kind", {"x.yaml": "apiVersion: pdp/v1\nrules: []\n"}, [("x.yaml", 1, "unknown kind None")]),
    Bad(
        "wrong-api-version",
        {"x.yaml": "kind: Rules\napiVersion: pdp/v2\nrules: []\n"},
        [("x.yaml", 2, "apiVersion must be 'pdp/v1'")],
    ),
    Bad("not-a-mapping", {"x.yaml": "- apiVersion: pdp/v1\n"}, [("x.yaml", 1, "must be a mapping")]),
    Bad(
        "invalid-duration",
        {
            "rules.yaml": rules("'true'", "approval:", "  groups: [ops]", "  expires_in: 30x").replace(
                "effect: allow", "effect: needs_approval"
            )
        },
        [("rules.yaml", 9, "invalid duration '30x'")],
    ),
    Bad(
        "invalid-default-approval-duration",
        {"bundle.yaml": BUNDLE + "default_approval: {groups: [ops], expires_in: 0s}\n"},
        [("bundle.yaml", 6, "must be positive")],
        base=False,
    ),
    Bad(
        "yaml-syntax-error",
        {"rules.yaml": RULE_HEAD + "    when: [true\n    message: 'x'\n"},
        [("rules.yaml", 7, "invalid YAML")],
    ),
    Bad(
        "duplicate-yaml-key",
        {"rules.yaml": rules("'true'", "when: 'false'")},
        [("rules.yaml", 7, "duplicate key 'when'")],
    ),
    Bad("not-utf8", {}, [("rules.yaml", 0, "not valid UTF-8")]),  # file written by the test
    Bad(
        "rule-tool-not-in-catalog",
        {"rules.yaml": rules("'true'", "tools: [tickets, payroll]")},
        [("rules.yaml", 7, "no tool in the catalog matches 'payroll'")],
    ),
    Bad(
        "rule-tool-glob-matching-nothing",
        {"rules.yaml": rules("'true'", "tools:", "  - 'pay*'")},
        [("rules.yaml", 8, "no tool in the catalog matches 'pay*'")],
    ),
    Bad(
        "needs-approval-without-any-approval",
        {"bundle.yaml": BUNDLE, "rules.yaml": rules("'true'").replace("effect: allow", "effect: needs_approval")},
        [("rules.yaml", 4, "rule 'r1' needs approval but has no approval")],
        base=False,
    ),
    Bad(
        "approval-required-boundary-without-any-approval",
        {
            "bundle.yaml": BUNDLE,
            "boundaries.yaml": """
                apiVersion: pdp/v1
                kind: Boundaries
                boundaries:
                  - name: billing
                    match: 'true'
                    tier: approval_required
            """,
        },
        [("boundaries.yaml", 4, "boundary 'billing' is approval_required but has no approval")],
        base=False,
    ),
    Bad(
        "approval-on-allow-rule",
        {"rules.yaml": rules("'true'", "approval: {groups: [ops]}")},
        [("rules.yaml", 7, "approval is only meaningful on needs_approval")],
    ),
    Bad(
        "unknown-variable",
        {"rules.yaml": rules("'variables.nope'")},
        [("rules.yaml", 6, "unknown variable 'nope'")],
    ),
    Bad(
        "variable-cycle",
        {
            "rules.yaml": """
                apiVersion: pdp/v1
                kind: Rules
                variables:
                  a: 'variables.b'
                  b: 'variables.a'
                rules:
                  - {id: r1, effect: allow, when: 'true'}
            """
        },
        [("rules.yaml", 4, "variables form a cycle"), ("rules.yaml", 5, "variables form a cycle")],
    ),
    Bad(
        "variable-type-error",
        {
            "rules.yaml": """
                apiVersion: pdp/v1
                kind: Rules
                variables:
                  big: 'action.estimated_cost_usd > 10'
                rules:
                  - id: r1
                    effect: allow
                    when: 'variables.big'
            """
        },
        [("rules.yaml", 4, "variable 'big': ")],
    ),
    Bad(
        "duplicate-tool",
        {"z-tools.yaml": TOOLS},
        [("z-tools.yaml", 4, "duplicate tool name 'tickets'")],
    ),
    Bad(
        "tool-operation-kind",
        {"tools.yaml": TOOLS.replace("POST: write", "POST: delete"), "bundle.yaml": BUNDLE},
        [("tools.yaml", 7, "tools.0.operations.POST")],
        base=False,
    ),
    Bad(
        "policy-test-unknown-rule",
        {
            "rules.yaml": rules("'true'"),
            "tests.yaml": """
                apiVersion: pdp/v1
                kind: PolicyTest
                tests:
                  - name: t
                    input:
                      agent: {id: a1}
                      action: {tool: tickets, operation: POST, resource: "http://127.0.0.1:8282/api/1"}
                    expect: {outcome: allow, rules: [r1, r2]}
            """,
        },
        [("tests.yaml", 4, "test 't' expects unknown rule 'r2'")],
    ),
    Bad(
        "policy-test-unknown-boundary",
        {
            "tests.yaml": """
                apiVersion: pdp/v1
                kind: PolicyTest
                tests:
                  - name: t
                    input:
                      agent: {id: a1}
                      action: {tool: tickets, operation: POST, resource: "http://127.0.0.1:8282/api/1"}
                    expect: {outcome: allow, boundary: nowhere}
            """,
        },
        [("tests.yaml", 4, "test 't' expects unknown boundary 'nowhere'")],
    ),
    Bad(
        "policy-test-unknown-key",
        {
            "tests.yaml": """
                apiVersion: pdp/v1
                kind: PolicyTest
                tests:
                  - name: t
                    input:
                      agent: {id: a1}
                      action: {tool: tickets, operation: POST, resource: "http://127.0.0.1:8282/api/1"}
                      justification: trust me
                    expect: {outcome: allow}
            """,
        },
        [("tests.yaml", 8, "tests.0.input.justification: unknown key")],
    ),
    Bad(
        "policy-test-bad-outcome",
        {
            "tests.yaml": """
                apiVersion: pdp/v1
                kind: PolicyTest
                tests:
                  - name: t
                    input:
                      agent: {id: a1}
                      action: {tool: tickets, operation: POST, resource: "http://127.0.0.1:8282/api/1"}
                    expect: {outcome: maybe}
            """,
        },
        [("tests.yaml", 8, "tests.0.expect.outcome")],
    ),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_problem_is_reported_at_file_and_line(tmp_path: Path, case: Bad) -> None:
    files = dict(case.files)
    if case.base:
        files = {"bundle.yaml": BUNDLE_WITH_APPROVAL, "tools.yaml": TOOLS, **files}
    if case.id == "not-utf8":
        (tmp_path / "rules.yaml").write_bytes(b"apiVersion: pdp/v1\nkind: Rules\n# \xff\xfe\n")
    error = load_files(tmp_path, files)

    got = [(p.location.file, p.location.line, p.message) for p in error.problems]
    assert len(got) == len(case.problems), got
    for (file, line, message), (want_file, want_line, fragment) in zip(got, case.problems, strict=True):
        assert (file, line) == (want_file or str(tmp_path), want_line), got
        assert fragment in message, got
        # the exception's text carries file:line for every problem
        assert f"{file}:{line}: {message}" in str(error)


def test_every_problem_is_reported_at_once_sorted(tmp_path: Path) -> None:
    # written in an order that is neither the file order nor the line order
    write_text(tmp_path, "z-rules.yaml", rules("'action.resourse == \"x\"'"))
    write_text(tmp_path, "bundle.yaml", BUNDLE_WITH_APPROVAL)
    write_text(
        tmp_path,
        "a-boundaries.yaml",
        """
        apiVersion: pdp/v1
        kind: Boundaries
        boundaries:
          - name: iam
            match: 'action.tool =='
            tier: human_only
            colour: red
        """,
    )
    write_text(tmp_path, "tools.yaml", TOOLS)
    write_text(tmp_path, "m-rules.yaml", rules("'true'", "tools: [payroll]").replace("r1", "r2"))
    error = load_files(tmp_path, {})

    where = [(p.location.file, p.location.line) for p in error.problems]
    assert where == [
        ("a-boundaries.yaml", 7),  # unknown key: the schema check stops this document here
        ("m-rules.yaml", 7),
        ("z-rules.yaml", 6),
    ]
    assert str(error) == "\n".join(str(p) for p in error.problems)


def test_problems_in_one_document_are_all_reported(tmp_path: Path) -> None:
    text = """
        apiVersion: pdp/v1
        kind: Rules
        rules:
          - id: r1
            effect: allow
            when: 'action.resourse == "x"'
            message: '1'
          - id: r1
            effect: needs_approval
            when: '"nope"'
            tools: [payroll]
    """
    write_text(tmp_path, "bundle.yaml", BUNDLE)
    write_text(tmp_path, "tools.yaml", TOOLS)
    error = load_files(tmp_path, {"rules.yaml": text})
    got = [(p.location.line, p.message) for p in error.problems]
    assert [line for line, _ in got] == [6, 7, 8, 8, 10, 11]
    messages = "\n".join(m for _, m in got)
    for fragment in (
        "resourse",
        "must be string",
        "duplicate rule id 'r1'",
        "needs approval but has no approval",
        "must be bool",
        "payroll",
    ):
        assert fragment in messages


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as excinfo:
        load_bundle(tmp_path / "nope")
    assert "does not exist" in str(excinfo.value)


# --- what a good bundle loads into ------------------------------------------------------------------


def test_loaded_bundle_contents(tmp_path: Path) -> None:
    write_text(tmp_path, "bundle.yaml", BUNDLE_WITH_APPROVAL)
    write_text(tmp_path, "tools.yaml", TOOLS)
    write_text(
        tmp_path,
        "policy/rules.yml",
        """
        apiVersion: pdp/v1
        kind: Boundaries
        boundaries:
          - name: iam
            match: 'action.resource.contains("/iam/")'
            tier: human_only
            applies_to: all
        ---
        apiVersion: pdp/v1
        kind: Rules
        rules:
          - id: bulk
            description: Bulk needs a lead
            tools: [tickets]
            effect: needs_approval
            when: 'true'
            approval: {groups: [leads], min_approvals: 2, expires_in: 1h30m}
        """,
    )
    write_text(tmp_path, "README.md", "not: [yaml")  # other files are ignored
    bundle = load_bundle(tmp_path)

    assert bundle.name == "acme"
    assert bundle.default_tier is Tier.AI_WRITABLE
    assert bundle.default_effect is Outcome.DENY
    assert bundle.default_approval is not None
    assert bundle.default_approval.groups == ("ops",)
    assert bundle.tools["tickets"].operations == {"GET": Kind.READ, "POST": Kind.WRITE}
    assert [(b.name, b.tier, b.applies_to_all) for b in bundle.boundaries] == [("iam", Tier.HUMAN_ONLY, True)]
    [rule] = bundle.rules
    assert (rule.id, rule.effect, rule.tools, rule.description) == (
        "bulk",
        Outcome.NEEDS_APPROVAL,
        ("tickets",),
        "Bulk needs a lead",
    )
    assert rule.approval is not None
    assert (rule.approval.groups, rule.approval.min_approvals, rule.approval.expires_in.total_seconds()) == (
        ("leads",),
        2,
        5400,
    )
    assert (rule.location.file, rule.location.line) == ("policy/rules.yml", 12)


def test_a_tool_takes_a_query_only_when_its_entry_says_so(tmp_path: Path) -> None:
    write_text(tmp_path, "bundle.yaml", BUNDLE_WITH_APPROVAL)
    plain = "  - {name: plain, type: http, resource_prefix: 'x://', operations: {get: read}}\n"
    write_text(tmp_path, "tools.yaml", TOOLS + "    query: true\n" + plain)
    bundle = load_bundle(tmp_path)
    assert (bundle.tools["tickets"].query, bundle.tools["plain"].query) == (True, False)


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]"])
def test_the_query_key_is_a_boolean(tmp_path: Path, value: str) -> None:
    error = load_files(tmp_path, {"bundle.yaml": BUNDLE_WITH_APPROVAL, "tools.yaml": TOOLS + f"    query: {value}\n"})
    assert [(p.location.file, p.location.line) for p in error.problems] == [("tools.yaml", 8)]
    assert "tools.0.query" in error.problems[0].message


def test_default_effect_defaults_to_deny(tmp_path: Path) -> None:
    write_text(tmp_path, "bundle.yaml", BUNDLE.replace("default_effect: deny\n", ""))
    write_text(tmp_path, "tools.yaml", TOOLS)
    bundle = load_bundle(tmp_path)
    assert bundle.default_effect is Outcome.DENY
    assert decide(bundle, request()).outcome is Outcome.DENY


# --- policy version ------------------------------------------------------------------------------------


def test_policy_version_is_a_content_digest(tmp_path: Path) -> None:
    rules_ = [{"id": "r", "effect": "allow", "when": "true"}]
    first = make_bundle(tmp_path / "one", rules=rules_)
    same = make_bundle(tmp_path / "two", rules=rules_)
    assert first.policy_version.startswith("sha256:")
    assert first.policy_version == f"sha256:{first.digest[:16]}"
    assert first.git_commit is None
    # same content in another directory: same version
    assert same.policy_version == first.policy_version
    # reloading unchanged: same version
    assert load_bundle(tmp_path / "one").policy_version == first.policy_version


@pytest.mark.parametrize(
    "change",
    ["edit-rule", "whitespace", "rename-file", "add-file"],
)
def test_policy_version_changes_with_content(tmp_path: Path, change: str) -> None:
    directory = write_bundle(tmp_path, rules=[{"id": "r", "effect": "allow", "when": "true"}])
    before = load_bundle(directory).policy_version
    rules_file = directory / "rules.yaml"
    if change == "edit-rule":
        rules_file.write_text(rules_file.read_text().replace("allow", "deny"))
    elif change == "whitespace":
        rules_file.write_text(rules_file.read_text() + "\n")
    elif change == "rename-file":
        rules_file.rename(directory / "rules2.yaml")
    else:
        write_text(directory, "more.yaml", "apiVersion: pdp/v1\nkind: Rules\nrules: []\n")
    after = load_bundle(directory).policy_version
    assert after != before
    assert after.startswith("sha256:")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_policy_version_names_the_git_commit(tmp_path: Path) -> None:
    directory = write_bundle(tmp_path, rules=[{"id": "r", "effect": "allow", "when": "true"}])
    git = ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "policy"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    bundle = load_bundle(directory)
    assert bundle.git_commit == commit
    assert bundle.policy_version == f"sha256:{bundle.digest[:16]}+git.{commit[:12]}"
    assert decide(bundle, request(resource=TICKETS + "x")).policy_version == bundle.policy_version


# --- known defects -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bundle",
    [
        BUNDLE.replace("default_tier: ai_writable\n", ""),
        BUNDLE + "owner: sec\n",
    ],
    ids=["missing-default-tier", "unknown-key"],
)
def test_invalid_bundle_document_is_not_also_missing(tmp_path: Path, bundle: str) -> None:
    error = load_files(tmp_path, {"bundle.yaml": bundle, "tools.yaml": TOOLS})
    assert [p.location.file for p in error.problems] == ["bundle.yaml"]


@pytest.mark.parametrize(
    "variables",
    [
        "  a: 'variables.nope'\n",
        "  a: 'variables.b'\n  b: 'variables.a'\n",
        "  big: 'action.estimated_cost_usd > 10'\n",
    ],
    ids=["unknown", "cycle", "type-error"],
)
def test_variable_problems_show_what_the_author_wrote(tmp_path: Path, variables: str) -> None:
    text = "apiVersion: pdp/v1\nkind: Rules\nvariables:\n" + variables + "rules: []\n"
    error = load_files(tmp_path, {"bundle.yaml": BUNDLE, "tools.yaml": TOOLS, "rules.yaml": text})
    assert error.problems
    for problem in error.problems:
        assert "__var_" not in problem.message
        assert "cel.bind" not in problem.message
    lines = [p.location.line for p in error.problems]
    assert len(lines) == len(set(lines))  # one problem per variable


def test_default_effect_needs_approval_requires_default_approval(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as excinfo:
        make_bundle(tmp_path, default_effect="needs_approval", default_approval=None)
    assert "default_approval" in str(excinfo.value)


# --- durations -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784), ("1500ms", 1.5)],
)
def test_valid_durations(tmp_path: Path, text: str, seconds: float) -> None:
    bundle = make_bundle(tmp_path, default_approval={"groups": ["ops"], "expires_in": text})
    assert bundle.default_approval is not None
    assert bundle.default_approval.expires_in.total_seconds() == seconds


@pytest.mark.parametrize(
    "text", ["30x", "1h30x", "x1h", "1.5h", "-5m", "0s", "0m0s", "", " ", "h", "1 h", "10", "366d", "99999999999d"]
)
def test_invalid_durations(tmp_path: Path, text: str) -> None:
    with pytest.raises(BundleError) as excinfo:
        make_bundle(tmp_path, default_approval={"groups": ["ops"], "expires_in": text})
    [problem] = [p for p in excinfo.value.problems if p.location.file == "bundle.yaml"]
    assert "default_approval.expires_in" in problem.message
    assert "invalid duration" in problem.message


def test_a_schema_error_in_one_rule_does_not_hide_the_others(tmp_path: Path) -> None:
    """Items of a list are validated one by one: the valid rules still compile and report their problems."""
    text = """
        apiVersion: pdp/v1
        kind: Rules
        rules:
          - id: typo
            effect: allow
            colour: blue
            when: 'true'
          - id: typed
            effect: allow
            when: 'action.resourse == "x"'
    """
    error = load_files(tmp_path, {"bundle.yaml": BUNDLE, "tools.yaml": TOOLS, "rules.yaml": text})
    got = [(p.location.file, p.location.line, p.message) for p in error.problems]
    assert len(got) == 2, got
    assert got[0][:2] == ("rules.yaml", 6) and "colour: unknown key" in got[0][2]
    assert got[1][:2] == ("rules.yaml", 10) and "undefined field 'resourse'" in got[1][2]


def test_tests_naming_a_broken_rule_are_not_reported_as_unknown(tmp_path: Path) -> None:
    """A rule that fails to compile is reported once, where it is written, not again by every test naming it."""
    files = {
        "bundle.yaml": BUNDLE,
        "tools.yaml": TOOLS,
        "rules.yaml": rules("'action.resourse == \"x\"'"),
        "tests.yaml": """
            apiVersion: pdp/v1
            kind: PolicyTest
            tests:
              - name: names the broken rule
                input:
                  agent: {id: a}
                  action: {tool: tickets, operation: GET, resource: "http://127.0.0.1:8282/api/1"}
                expect: {outcome: allow, rules: [r1]}
        """,
    }
    error = load_files(tmp_path, files)
    assert [(p.location.file, p.location.line) for p in error.problems] == [("rules.yaml", 6)]


def test_an_invalid_bundle_document_does_not_make_approvals_look_missing(tmp_path: Path) -> None:
    bundle = BUNDLE_WITH_APPROVAL.replace("default_tier: ai_writable\n", "")
    error = load_files(tmp_path, {"bundle.yaml": bundle, "tools.yaml": TOOLS, "rules.yaml": rules("'true'")})
    messages = [p.message for p in error.problems]
    assert len(messages) == 1 and "default_tier" in messages[0], messages


def test_hidden_directories_are_not_policy(tmp_path: Path) -> None:
    """A bundle that is a git checkout carries .github/ workflows: they must not be read as policy documents."""
    make_bundle(tmp_path)
    write_text(tmp_path, ".github/workflows/ci.yml", "name: ci\non: [push]\n")
    write_text(tmp_path, "rules/.draft/wip.yaml", "apiVersion: pdp/v1\nkind: Nope\n")
    version = load_bundle(tmp_path).policy_version
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text("name: changed\n")
    assert load_bundle(tmp_path).policy_version == version  # not even part of the digest
