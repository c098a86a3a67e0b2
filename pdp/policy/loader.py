"""Load a bundle directory in named stages — read, validate, compile, check — collecting every problem.

A bundle with any problem does not load: :class:`BundleError` carries all of them, sorted by file and
line, so a security team fixes everything in one pass.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pdp.policy.bundle import Approval, Boundary, Limit, PolicyBundle, PolicyTestCase, Rule
from pdp.policy.catalog import Kind, Tool
from pdp.policy.cel import CelError, CelProgram, Environment, ResultType
from pdp.policy.decision import Outcome, Tier
from pdp.policy.documents import (
    API_VERSION,
    DOCUMENT_KINDS,
    ApprovalSpec,
    BoundariesDoc,
    BundleDoc,
    LimitsDoc,
    PolicyTestDoc,
    RulesDoc,
    ScopeKeySpec,
    ToolsDoc,
    parse_budget,
    parse_rate,
)
from pdp.policy.duration import parse_duration
from pdp.policy.source import Document, Location, SourceError, git_commit, read_documents


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class BundleError(Exception):
    """The bundle did not load; ``problems`` lists every reason, sorted by file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(set(problems), key=lambda p: (p.location.file, p.location.line, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


_ENVIRONMENTS: dict[bool, Environment] = {}


def shared_environment(*, lint: bool = False) -> Environment:
    """One CEL environment per process (building one parses the extension config).

    ``lint=True`` also declares ``variables`` as an untyped map, to check expressions as written.
    """
    env = _ENVIRONMENTS.get(lint)
    if env is None:
        env = _ENVIRONMENTS[lint] = Environment(declare_variables=lint)
    return env


def load_bundle(directory: str | Path) -> PolicyBundle:
    """Load and compile a bundle; raise :class:`BundleError` listing every problem."""
    return _Loader(Path(directory)).load()


# --- variables --------------------------------------------------------------------------------------

_VARIABLE_REF = re.compile(r"(?<![\w.])variables\.([A-Za-z_]\w*)")
# The list in each kind whose items are validated one by one when the document as a whole is not valid.
_ITEM_LISTS = {
    "Rules": "rules",
    "Boundaries": "boundaries",
    "Tools": "tools",
    "PolicyTest": "tests",
    "Limits": "limits",
}
_USAGE = re.compile(r"\busage\b")
_VARIABLE_ALIAS = re.compile(r"__var_([A-Za-z_]\w*)")
_STRING_START = re.compile(r"""[rRbB]{0,2}('''|\"\"\"|'|")""")


def _code_spans(source: str) -> list[tuple[int, int]]:
    """The spans of ``source`` outside string literals, so references inside strings are left alone."""
    spans: list[tuple[int, int]] = []
    pos = start = 0
    while pos < len(source):
        match = _STRING_START.match(source, pos)
        if match is None or (pos > 0 and (source[pos - 1].isalnum() or source[pos - 1] == "_")):
            pos += 1
            continue
        spans.append((start, pos))
        quote = match.group(1)
        raw = "r" in match.group(0).lower()
        pos = match.end()
        while pos < len(source) and not source.startswith(quote, pos):
            pos += 2 if source[pos] == "\\" and not raw else 1
        pos += len(quote)
        start = pos
    spans.append((start, len(source)))
    return spans


def _references(source: str) -> list[str]:
    names: list[str] = []
    for begin, end in _code_spans(source):
        names.extend(m.group(1) for m in _VARIABLE_REF.finditer(source, begin, end))
    return names


def _substitute(source: str) -> str:
    out: list[str] = []
    last = 0
    for begin, end in _code_spans(source):
        out.append(source[last:begin])
        out.append(_VARIABLE_REF.sub(lambda m: f"__var_{m.group(1)}", source[begin:end]))
        last = end
    out.append(source[last:])
    return "".join(out)


class _Variables:
    """A Rules document's ``variables``: named expressions, bound with ``cel.bind`` where used."""

    def __init__(self, definitions: dict[str, str]) -> None:
        self.definitions = definitions

    def order(self, roots: list[str]) -> tuple[list[str], list[str]]:
        """Variables needed by ``roots`` with dependencies first, and any unknown or cyclic names."""
        ordered: list[str] = []
        problems: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name not in self.definitions:
                problems.append(f"unknown variable {name!r}")
                return
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                problems.append("variables form a cycle: " + " -> ".join((*chain, name)))
                return
            state[name] = 1
            for dep in _references(self.definitions[name]):
                visit(dep, (*chain, name))
            state[name] = 2
            ordered.append(name)

        for root in roots:
            visit(root, ())
        return ordered, problems

    def expand(self, source: str) -> tuple[str, list[str]]:
        needed, problems = self.order(_references(source))
        expanded = _substitute(source)
        for name in reversed(needed):
            expanded = f"cel.bind(__var_{name}, ({_substitute(self.definitions[name])}), {expanded})"
        return expanded, problems


def _is_item(path: tuple[Any, ...], field: str) -> bool:
    return len(path) >= 2 and path[0] == field and isinstance(path[1], int)


# --- the stages -------------------------------------------------------------------------------------


class _Loader:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.problems: list[Problem] = []
        self.env = shared_environment()
        self.saw_bundle_kind = False
        self.declared_rules: set[str] = set()
        self.declared_boundaries: set[str] = set()
        self.lint_env = shared_environment(lint=True)

    def problem(self, location: Location, message: str) -> None:
        self.problems.append(Problem(location, message))

    def load(self) -> PolicyBundle:
        try:
            documents, digest = read_documents(self.directory)
        except SourceError as exc:
            raise BundleError([Problem(exc.location, exc.message)]) from exc
        parsed = self._validate(documents)
        bundle = self._compile(parsed, digest)
        if self.problems or bundle is None:
            raise BundleError(self.problems)
        return bundle

    # stage 1: every document against its kind's schema
    def _validate(self, documents: list[Document]) -> list[tuple[Any, Document]]:
        parsed: list[tuple[Any, Document]] = []
        for doc in documents:
            if not isinstance(doc.data, dict):
                self.problem(doc.location(), "a document must be a mapping with apiVersion and kind")
                continue
            if doc.data.get("apiVersion") != API_VERSION:
                self.problem(doc.location(("apiVersion",)), f"apiVersion must be {API_VERSION!r}")
                continue
            kind = doc.data.get("kind")
            model = DOCUMENT_KINDS.get(kind) if isinstance(kind, str) else None
            self.saw_bundle_kind |= kind == "Bundle"
            if model is None or not isinstance(kind, str):
                known = ", ".join(DOCUMENT_KINDS)
                self.problem(doc.location(("kind",)), f"unknown kind {kind!r} (expected one of: {known})")
                continue
            self._declare(kind, doc.data)
            try:
                parsed.append((model.model_validate(doc.data), doc))
            except ValidationError as exc:
                self._schema_problems(kind, doc, exc)
                partial = self._valid_items(model, kind, doc)
                if partial is not None:
                    parsed.append(partial)
        return parsed

    def _schema_problems(self, kind: str, doc: Document, exc: ValidationError) -> None:
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "document"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            self.problem(doc.location(loc), f"{kind}: {field}: {message}")

    def _valid_items(self, model: type[Any], kind: str, doc: Document) -> tuple[Any, Document] | None:
        """The document with only its valid list items, so one bad rule does not hide problems in the others.

        Line numbers are re-keyed to the kept items' new positions, so locations still point at the source.
        """
        field = _ITEM_LISTS.get(kind)
        items = doc.data.get(field) if field else None
        if field is None or not isinstance(items, list):
            return None
        item_model = model.model_fields[field].annotation.__args__[0]
        kept: list[int] = []
        for index, item in enumerate(items):
            try:
                item_model.model_validate(item)
            except ValidationError:
                continue
            kept.append(index)
        try:
            partial = model.model_validate({**doc.data, field: [items[i] for i in kept]})
        except ValidationError:
            return None  # the envelope itself is broken; its problems are already reported
        new_index: dict[str | int, int] = {old: new for new, old in enumerate(kept)}
        lines = {
            ((field, new_index[path[1]], *path[2:]) if _is_item(path, field) else path): line
            for path, line in doc.lines.items()
            if not _is_item(path, field) or path[1] in new_index
        }
        return partial, Document(partial, doc.file, doc.line, lines)

    def _declare(self, kind: str, data: dict[str, Any]) -> None:
        """Remember every rule id and boundary name written, valid or not, for cross-reference checks."""
        key, names = {"Rules": ("id", self.declared_rules), "Boundaries": ("name", self.declared_boundaries)}.get(
            kind, ("", None)
        )
        items = data.get(_ITEM_LISTS.get(kind, ""))
        if names is not None and isinstance(items, list):
            names.update(item[key] for item in items if isinstance(item, dict) and isinstance(item.get(key), str))

    def _approval(self, spec: ApprovalSpec | None) -> Approval | None:
        if spec is None:
            return None
        return Approval(tuple(spec.groups), spec.min_approvals, parse_duration(spec.expires_in))

    def _cel(self, source: str, result: ResultType, where: Location, what: str) -> CelProgram | None:
        try:
            return self.env.compile(source, result)
        except CelError as exc:
            self.problem(where, f"{what}: {exc}")
            return None

    # stage 2: compile every expression, build the catalog, check cross-references
    def _compile(self, parsed: list[tuple[Any, Document]], digest: str) -> PolicyBundle | None:
        bundles = [(m, d) for m, d in parsed if isinstance(m, BundleDoc)]
        if not bundles and not self.saw_bundle_kind:  # an invalid one was already reported
            self.problem(Location(str(self.directory), 0), "no 'kind: Bundle' document (it sets default_tier)")
        for _, doc in bundles[1:]:
            self.problem(doc.location(), "more than one 'kind: Bundle' document")
        head = bundles[0][0] if bundles else None
        default_approval = self._approval(head.default_approval) if head else None

        tools = self._tools(parsed)
        # With the Bundle document itself invalid, whether a default approval exists is unknown: say nothing.
        has_default = default_approval is not None or (head is None and self.saw_bundle_kind)
        boundaries = self._boundaries(parsed, has_default)
        rules = self._rules(parsed, tools, has_default)
        # Against what was written, not what compiled: a broken rule is reported once, where it is.
        tests = self._tests(parsed, self.declared_rules, self.declared_boundaries)
        limits = self._limits(parsed, tools)

        if head is None:
            return None
        if head.default_effect == "needs_approval" and default_approval is None:
            self.problem(
                bundles[0][1].location(("default_effect",)),
                "default_effect needs_approval needs default_approval (who approves when no rule matches)",
            )
        if head.default_tier == "approval_required" and default_approval is None:
            doc = bundles[0][1]
            self.problem(
                doc.location(("default_tier",)),
                "default_tier approval_required needs default_approval (who approves writes no boundary matches)",
            )
        commit = git_commit(self.directory)
        version = f"sha256:{digest[:16]}" + (f"+git.{commit[:12]}" if commit else "")
        return PolicyBundle(
            name=head.name,
            default_tier=Tier(head.default_tier),
            default_effect=Outcome(head.default_effect),
            default_approval=default_approval,
            tools=tools,
            boundaries=tuple(boundaries),
            rules=tuple(rules),
            tests=tuple(tests),
            limits=tuple(limits),
            digest=digest,
            git_commit=commit,
            policy_version=version,
            environment=self.env,
            uses_usage=self._uses_usage(parsed),
        )

    @staticmethod
    def _uses_usage(parsed: list[tuple[Any, Document]]) -> bool:
        sources: list[str] = []
        for model, _ in parsed:
            if isinstance(model, RulesDoc):
                sources += list(model.variables.values())
                sources += [r.when for r in model.rules] + [r.message or "" for r in model.rules]
            elif isinstance(model, BoundariesDoc):
                sources += [b.match for b in model.boundaries]
            elif isinstance(model, LimitsDoc):
                sources += [spec.scope.key for spec in model.limits if isinstance(spec.scope, ScopeKeySpec)]
        return any(_USAGE.search(source) for source in sources)

    def _limits(self, parsed: list[tuple[Any, Document]], tools: dict[str, Tool]) -> list[Limit]:
        out: list[Limit] = []
        ids: set[str] = set()
        for model, doc in parsed:
            if not isinstance(model, LimitsDoc):
                continue
            for i, spec in enumerate(model.limits):
                here = ("limits", i)
                if spec.id in ids:
                    self.problem(doc.location((*here, "id")), f"duplicate limit id {spec.id!r}")
                ids.add(spec.id)
                for j, pattern in enumerate(spec.tools or ()):
                    if not any(fnmatch.fnmatchcase(name, pattern) for name in tools):
                        self.problem(
                            doc.location((*here, "tools", j)),
                            f"limit {spec.id!r}: no tool in the catalog matches {pattern!r}",
                        )
                key = None
                if isinstance(spec.scope, ScopeKeySpec):
                    key = self._cel(
                        spec.scope.key, ResultType.STRING, doc.location((*here, "scope", "key")), f"limit {spec.id}"
                    )
                    if key is None:
                        continue
                common: dict[str, Any] = {
                    "id": spec.id,
                    "scope": "key" if key is not None else str(spec.scope),
                    "key": key,
                    "tools": tuple(spec.tools) if spec.tools is not None else None,
                    "location": doc.location(here),
                }
                if spec.rate is not None:
                    count, window = parse_rate(spec.rate)
                    out.append(Limit(kind="rate", count=count, window=window, **common))
                elif spec.budget_usd is not None:
                    out.append(
                        Limit(
                            kind="budget",
                            budget_usd=parse_budget(spec.budget_usd),
                            on_exceed=Outcome(spec.on_exceed),
                            approval=self._approval(spec.approval),
                            **common,
                        )
                    )
                elif spec.retry_storm is not None:
                    storm = spec.retry_storm
                    out.append(
                        Limit(
                            kind="retry_storm",
                            repeats=storm.repeats,
                            window=parse_duration(storm.window),
                            quarantine=parse_duration(storm.quarantine),
                            **common,
                        )
                    )
        return out

    def _tools(self, parsed: list[tuple[Any, Document]]) -> dict[str, Tool]:
        tools: dict[str, Tool] = {}
        for model, doc in parsed:
            if not isinstance(model, ToolsDoc):
                continue
            for i, spec in enumerate(model.tools):
                if spec.name in tools:
                    self.problem(doc.location(("tools", i, "name")), f"duplicate tool name {spec.name!r}")
                    continue
                tools[spec.name] = Tool(
                    name=spec.name,
                    type=spec.type,
                    resource_prefix=spec.resource_prefix,
                    operations={op: Kind(kind) for op, kind in spec.operations.items()},
                    idempotent=spec.idempotent,
                    query=spec.query,
                )
        return tools

    def _boundaries(self, parsed: list[tuple[Any, Document]], has_default: bool) -> list[Boundary]:
        out: list[Boundary] = []
        names: set[str] = set()
        for model, doc in parsed:
            if not isinstance(model, BoundariesDoc):
                continue
            for i, spec in enumerate(model.boundaries):
                where = doc.location(("boundaries", i, "match"))
                if spec.name in names:
                    self.problem(doc.location(("boundaries", i, "name")), f"duplicate boundary {spec.name!r}")
                names.add(spec.name)
                if spec.tier == "approval_required" and spec.approval is None and not has_default:
                    self.problem(
                        doc.location(("boundaries", i)),
                        f"boundary {spec.name!r} is approval_required but has no approval "
                        "and the Bundle has no default_approval",
                    )
                program = self._cel(spec.match, ResultType.BOOL, where, f"boundary {spec.name!r} match")
                if program is None:
                    continue
                out.append(
                    Boundary(
                        name=spec.name,
                        description=spec.description,
                        match=program,
                        tier=Tier(spec.tier),
                        applies_to_all=spec.applies_to == "all",
                        approval=self._approval(spec.approval),
                        location=doc.location(("boundaries", i)),
                    )
                )
        return out

    def _rules(self, parsed: list[tuple[Any, Document]], tools: dict[str, Tool], has_default: bool) -> list[Rule]:
        out: list[Rule] = []
        ids: set[str] = set()
        for model, doc in parsed:
            if not isinstance(model, RulesDoc):
                continue
            variables = _Variables(dict(model.variables))
            broken: set[str] = set()
            for name, source in model.variables.items():
                where = doc.location(("variables", name))
                if self._check_expression(variables, broken, source, None, where, f"variable {name!r}") is None:
                    broken.add(name)
            for i, spec in enumerate(model.rules):
                here = ("rules", i)
                if spec.id in ids:
                    self.problem(doc.location((*here, "id")), f"duplicate rule id {spec.id!r}")
                ids.add(spec.id)
                if spec.effect == "needs_approval" and spec.approval is None and not has_default:
                    self.problem(
                        doc.location(here),
                        f"rule {spec.id!r} needs approval but has no approval and the Bundle has no default_approval",
                    )
                if spec.approval is not None and spec.effect != "needs_approval":
                    self.problem(doc.location((*here, "approval")), "approval is only meaningful on needs_approval")
                if spec.tools is not None:
                    for j, pattern in enumerate(spec.tools):
                        if not any(fnmatch.fnmatchcase(name, pattern) for name in tools):
                            self.problem(
                                doc.location((*here, "tools", j)),
                                f"rule {spec.id!r}: no tool in the catalog matches {pattern!r}",
                            )
                when = self._compile_with_variables(
                    variables,
                    broken,
                    spec.when,
                    ResultType.BOOL,
                    doc.location((*here, "when")),
                    spec.id,
                    "when",
                )
                rendered = None
                if spec.message is not None:
                    rendered = self._compile_with_variables(
                        variables,
                        broken,
                        spec.message,
                        ResultType.STRING,
                        doc.location((*here, "message")),
                        spec.id,
                        "message",
                    )
                    if rendered is None:
                        continue
                if when is None:
                    continue
                out.append(
                    Rule(
                        id=spec.id,
                        description=spec.description,
                        effect=Outcome(spec.effect),
                        when=when,
                        message=rendered,
                        tools=tuple(spec.tools) if spec.tools is not None else None,
                        approval=self._approval(spec.approval),
                        location=doc.location(here),
                    )
                )
        return out

    def _compile_with_variables(
        self,
        variables: _Variables,
        broken: set[str],
        source: str,
        result: ResultType,
        where: Location,
        rule_id: str,
        what: str,
    ) -> CelProgram | None:
        program = self._check_expression(variables, broken, source, result, where, f"rule {rule_id!r} {what}")
        return program if isinstance(program, CelProgram) else None

    def _check_expression(
        self,
        variables: _Variables,
        broken: set[str],
        source: str,
        result: ResultType | None,
        where: Location,
        what: str,
    ) -> CelProgram | bool | None:
        """Compile ``source`` with its variables bound; report problems in the author's own terms.

        Returns the program (or True for a variable, which has no result type), or None on error.
        """
        expanded, problems = variables.expand(source)
        for message in problems:
            self.problem(where, f"{what}: {message}")
        if problems:
            return None
        if broken.intersection(_references(source)):
            return None  # the variable's own problem was reported where it is defined
        try:
            # First as written, with `variables` an untyped map: syntax errors and unknown names
            # point at the author's text. Then expanded, which type-checks through the variables.
            self.lint_env.check(source)
            if result is None:
                self.env.check(expanded)
                return True
            program = self.env.compile(expanded, result)
        except CelError as exc:
            message = _VARIABLE_ALIAS.sub(r"variables.\1", str(exc))
            self.problem(where, f"{what}: {message}")
            return None
        program.source = source
        return program

    def _tests(
        self, parsed: list[tuple[Any, Document]], rule_ids: set[str], boundary_names: set[str]
    ) -> list[PolicyTestCase]:
        out: list[PolicyTestCase] = []
        for model, doc in parsed:
            if not isinstance(model, PolicyTestDoc):
                continue
            for i, case in enumerate(model.tests):
                where = doc.location(("tests", i))
                for rule in case.expect.rules or []:
                    if rule not in rule_ids:
                        self.problem(where, f"test {case.name!r} expects unknown rule {rule!r}")
                boundary = case.expect.boundary
                if boundary and boundary not in boundary_names:
                    self.problem(where, f"test {case.name!r} expects unknown boundary {boundary!r}")
                out.append(PolicyTestCase(case, where))
        return out
