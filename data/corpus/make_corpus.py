"""Regenerate the shipped training corpus from a CPython standard library.

The built-in model needs English prose that may be redistributed, and this
machine has no internet, so the corpus is cut out of text CPython itself ships
under the PSF License: the language reference topics that `pydoc` shows
(`pydoc_data/topics.py`) and the docstrings of the pure-Python standard library.
Only paragraphs that read like sentences are kept (no code, grammar rules or
doctests), so the model's output looks like words.

Output format, one document per topic, which the build script parses::

    ## Title

    First paragraph on one line.

    Second paragraph on one line.

Usage: python data/corpus/make_corpus.py --stdlib /path/to/lib/python3.13
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Directories whose docstrings are tests, tools or duplicates rather than prose.
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
     "ensurepip", "pydoc_data", "encodings", "__phello__", "__pycache__"}
)
UNDERLINE = re.compile(r"^([*=\-~^\"#+])\1{2,}$")
Document = tuple[str, list[str]]


def prose(paragraph: str) -> str | None:
    """Return the paragraph on one line if it reads like English sentences."""
    text = " ".join(line.strip() for line in paragraph.splitlines()).strip()
    if len(text) < 25 or len(text.split()) < 5 or not text.endswith(".") or text.startswith("["):
        return None
    if any(bad in text for bad in (">>>", "::=", "http", "TODO", "XXX", "\t")):
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    return text if letters / len(text) >= 0.9 else None


def paragraphs(text: str) -> list[str]:
    """Split on blank lines and keep the prose paragraphs."""
    kept = (prose(p) for p in re.split(r"\n\s*\n", text))
    return [p for p in kept if p]


def topic_documents(topics_py: Path) -> Iterator[Document]:
    """One document per section (heading + underline) of the pydoc topics."""
    tree = ast.parse(topics_py.read_text(encoding="utf-8"))
    topics: dict[str, str] = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics"
    )
    for key in sorted(topics):
        lines = topics[key].splitlines()
        title, body = key, []
        for i, line in enumerate(lines):
            next_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if UNDERLINE.match(next_line) and len(next_line) == len(line.strip()):
                yield title, paragraphs("\n".join(body))
                title, body = line.strip(), []
            elif not UNDERLINE.match(line.strip()):
                body.append(line)
        yield title, paragraphs("\n".join(body))


def module_name(stdlib: Path, path: Path) -> str:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stdlib_sources(stdlib: Path) -> Iterator[tuple[str, ast.Module]]:
    """Parse every public pure-Python module, in a stable order."""
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if SKIP_DIRS.intersection(rel) or any(p.startswith(("_", "config-")) for p in rel[:-1]):
            continue
        name = module_name(stdlib, path)
        if name.split(".")[-1].startswith("_"):
            continue
        try:
            yield name, ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue


def docstring_documents(stdlib: Path, functions: bool) -> Iterator[Document]:
    """Module and class docstrings, or function and method docstrings."""
    for name, tree in stdlib_sources(stdlib):
        if not functions:
            yield f"The {name} module", paragraphs(ast.get_docstring(tree) or "")
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                if not functions:
                    yield f"{name}.{node.name}", paragraphs(ast.get_docstring(node) or "")
                    continue
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                        doc = ast.get_docstring(item) or ""
                        yield f"{name}.{node.name}.{item.name}()", paragraphs(doc)
            elif functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not node.name.startswith("_"):
                    yield f"{name}.{node.name}()", paragraphs(ast.get_docstring(node) or "")


def write(path: Path, documents: Iterable[Document], seen: set[str]) -> None:
    """Write documents that still have a paragraph nobody wrote before."""
    chunks = []
    for title, paras in documents:
        fresh = [p for p in paras if p not in seen]
        seen.update(fresh)
        if fresh:
            chunks.append(f"## {title}\n\n" + "\n\n".join(fresh) + "\n")
    path.write_text("\n".join(chunks), encoding="utf-8")
    print(f"{path.name}: {path.stat().st_size} bytes, {len(chunks)} documents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    seen: set[str] = set()
    write(args.out / "python_reference.txt", topic_documents(args.stdlib / "pydoc_data" / "topics.py"), seen)
    write(args.out / "stdlib_modules.txt", docstring_documents(args.stdlib, functions=False), seen)
    write(args.out / "stdlib_functions.txt", docstring_documents(args.stdlib, functions=True), seen)


if __name__ == "__main__":
    main()
