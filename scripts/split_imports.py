"""Move the import statements of every non-exported code cell of nbs/*.ipynb into a cell of their own, just before it.

nbdev's doc processing (`nbdev_proc_nbs`, run by `nbdev_docs`) executes every cell that holds an import, whatever its
`#| slow` flag: a demo that trains next to its imports would train while the docs are built. A separate import cell is
run instead, and the demo is not. Exported cells are left alone (nbdev runs them anyway: they hold definitions only).
Usage: python scripts/split_imports.py [NOTEBOOK ...] [--check]   (--check: list the mixed cells, change nothing)"""
import ast, json, sys, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lines(s: str) -> list[str]:
    ls = s.split('\n')
    return [l + '\n' for l in ls[:-1]] + ([ls[-1]] if ls[-1] else [])


def _is_import(n) -> bool: return isinstance(n, (ast.Import, ast.ImportFrom))


def split_cell(src: str):
    """(imports, rest) of a non-exported cell that holds an import (at any depth, as nbdev's `_do_eval` sees it) next to
    other code, else None. Nested imports (in an `if`, a `with`, a function) are hoisted to the import cell, dedented;
    a cell that would not parse without them is left alone (None)."""
    lines = src.split('\n')
    directives = [l for l in lines if l.startswith('#|')]
    if any(d.replace(' ', '').startswith(('#|export', '#|exporti', '#|exports', '#|eval:false', '#|default_exp')) for d in directives): return None
    try: tree = ast.parse(src)
    except SyntaxError: return None  # magics: leave as they are
    imps = [n for n in ast.walk(tree) if _is_import(n)]
    if not imps or all(_is_import(n) for n in tree.body): return None
    take = set()
    for n in imps: take.update(range(n.lineno - 1, n.end_lineno))
    keep_flags = [d for d in directives if d.replace(' ', '') in ('#|hide',)]
    imported = [ast.unparse(n) for n in sorted(imps, key=lambda n: n.lineno)]
    imports = '\n'.join(keep_flags + list(dict.fromkeys(imported)))
    rest = '\n'.join(l for i, l in enumerate(lines) if i not in take).strip('\n')
    try: ast.parse(rest)
    except SyntaxError: return None  # e.g. `try: import x` with nothing else in the block
    return imports, rest


def process(path: Path, check: bool = False) -> int:
    nb = json.loads(path.read_text())
    out, n = [], 0
    for c in nb['cells']:
        r = split_cell(''.join(c['source'])) if c['cell_type'] == 'code' else None
        if r is None: out.append(c); continue
        n += 1
        if check: print(f"{path.name}: cell {c.get('id')} mixes imports with code"); out.append(c); continue
        imp = dict(cell_type='code', execution_count=None, id=uuid.uuid4().hex[:8], metadata={}, outputs=[], source=_lines(r[0]))
        c['source'] = _lines(r[1])
        out += [imp, c]
    if n and not check:
        nb['cells'] = out
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return n


if __name__ == '__main__':
    check = '--check' in sys.argv
    paths = [Path(p) for p in sys.argv[1:] if p != '--check'] or sorted((ROOT / 'nbs').glob('*.ipynb'))
    total = sum(process(p, check) for p in paths)
    print(f"{total} cell(s) {'mix imports with code' if check else 'split'} in {len(paths)} notebook(s)")
    sys.exit(1 if check and total else 0)
