"""Reading a bundle directory: YAML documents with the file and line of every key."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(slots=True)
class Document:
    """One YAML document: its plain data and where each element of it was written."""

    data: Any
    file: str
    line: int
    lines: dict[Path_, int] = field(default_factory=dict)

    def location(self, path: Path_ = ()) -> Location:
        """The closest recorded line for a path inside this document."""
        while path:
            if path in self.lines:
                return Location(self.file, self.lines[path])
            path = path[:-1]
        return Location(self.file, self.line)


class SourceError(Exception):
    def __init__(self, location: Location, message: str) -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


def _to_python(node: yaml.Node, path: Path_, lines: dict[Path_, int], file: str) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SourceError(Location(file, key_node.start_mark.line + 1), "mapping keys must be scalars")
            key = _SCALARS.construct_object(key_node, deep=True)
            if key in out:
                raise SourceError(Location(file, key_node.start_mark.line + 1), f"duplicate key {key!r}")
            out[key] = _to_python(value_node, (*path, key), lines, file)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines, file) for i, item in enumerate(node.value)]
    return _SCALARS.construct_object(node, deep=True)


# A constructor for plain scalars only (SafeLoader rules: no arbitrary objects).
_SCALARS = yaml.SafeLoader("")


def _bundle_files(directory: Path) -> list[Path]:
    # Hidden directories (.git, .github) hold CI config and the like, never policy.
    return sorted(
        p
        for p in directory.rglob("*")
        if p.suffix in {".yaml", ".yml"}
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def read_documents(directory: Path) -> tuple[list[Document], str]:
    """Every YAML document under ``directory`` (sorted by path) and the content digest of those files.

    Raises SourceError for unreadable or syntactically invalid YAML, at its file and line.
    """
    if not directory.is_dir():
        raise SourceError(Location(str(directory), 0), "policy directory does not exist")
    digest = hashlib.sha256()
    documents: list[Document] = []
    for path in _bundle_files(directory):
        rel = path.relative_to(directory).as_posix()
        raw = path.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        try:
            text = raw.decode("utf-8")
            for node in yaml.compose_all(text, Loader=yaml.SafeLoader):  # empty documents yield nothing
                lines: dict[Path_, int] = {}
                data = _to_python(node, (), lines, rel)
                documents.append(Document(data, rel, node.start_mark.line + 1, lines))
        except UnicodeDecodeError as exc:
            raise SourceError(Location(rel, 0), f"not valid UTF-8: {exc}") from exc
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            raise SourceError(Location(rel, line), f"invalid YAML: {exc.problem or exc}") from exc
    return documents, digest.hexdigest()


def git_commit(directory: Path) -> str | None:
    """The commit checked out where the bundle lives, when it is a git work tree."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None
