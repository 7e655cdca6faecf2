"""README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which an offline machine cannot install).

`python scripts/make_readme.py` writes README.md; `--check` exits 1 when README.md is out of date."""
import sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path=ROOT / 'nbs' / 'index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    out = []
    for cell in nb.cells:
        src = cell.source.strip()
        if not src or src.startswith('#| hide'): continue
        if cell.cell_type == 'markdown':
            # images are referenced relative to nbs/; the README lives one folder up
            out.append(src.replace('](images/', '](nbs/images/'))
        elif cell.cell_type == 'code':
            out.append('```python\n' + '\n'.join(l for l in src.splitlines() if not l.startswith('#|')) + '\n```')
    head = '<!-- generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file -->\n\n'
    return head + '\n\n'.join(out) + '\n'


if __name__ == '__main__':
    text = render()
    if '--check' in sys.argv:
        if (ROOT / 'README.md').read_text() != text:
            print('README.md is out of date: run `python scripts/make_readme.py`'); sys.exit(1)
    else:
        (ROOT / 'README.md').write_text(text)
