"""Build the documentation site of fgssl_nb from the notebooks in nbs/.

    python scripts/make_docs.py [--out DIR] [--fallback] [--jobs N]

With Quarto on PATH this runs `nbdev_docs` (the full nbdev 2 site, configured by nbs/_quarto.yml and nbs/sidebar.yml;
README.md is kept as scripts/make_readme.py wrote it). Without Quarto (or with `--fallback`) it renders every notebook
of nbs/ with nbconvert, which comes with jupyterlab: a static HTML site, one page per notebook, with the outputs stored
in the notebooks (nothing is executed), figures embedded as data URIs (pages open from file://, no server needed), and
a sidebar linking every page in notebook order. The site goes to settings.ini's `doc_path` (`_docs`) or `--out DIR`.

Like nbdev, the fallback leaves out `#| hide` cells (and `#| include: false`), the input of `#| echo: false` cells, the
outputs of `#| output: false` cells and the `#| default_exp` cells, and strips the `#|` directive lines from the code
it shows. Unlike nbdev, it shows the code of `#| export` cells (there is no `show_doc` rendering of signatures)."""
import argparse, configparser, html, os, re, shutil, subprocess, sys, time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_re_heading = re.compile(r'^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$', re.M)
_re_directive = re.compile(r'^\s*#\|\s*(.*?)\s*$')
MATHJAX_URL = 'https://cdnjs.cloudflare.com/ajax/libs/mathjax/2.7.7/latest.js?config=TeX-AMS_CHTML-full,Safe'
MATHJAX_CONFIG = '?config=TeX-AMS-MML_HTMLorMML-full,Safe'  # the configuration that package ships (HTML-CSS output)


def local_mathjax(out: Path) -> Path | None:
    "Copy MathJax 2.7 from the `jupyter-server-mathjax` package (a dev requirement) into `out/mathjax`: math renders offline. None without it."
    try: import jupyter_server_mathjax
    except ImportError: return None
    src = Path(jupyter_server_mathjax.__file__).parent / 'static'
    if not (src / 'MathJax.js').exists(): return None
    shutil.copytree(src, out / 'mathjax', ignore=shutil.ignore_patterns('*.py', '__pycache__'))
    return out / 'mathjax' / 'MathJax.js'


def settings(root=ROOT) -> dict:
    "The [DEFAULT] section of settings.ini."
    cp = configparser.ConfigParser()
    cp.read(root / 'settings.ini')
    return dict(cp['DEFAULT'])


def notebooks(nbs: Path) -> list:
    "The notebooks of `nbs` in nbdev's sidebar order (`nbdev_sidebar`): index first, then sorted; `_*`/`.*` skipped."
    files = [p for p in nbs.rglob('*.ipynb')
             if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts)]
    return sorted(files, key=lambda p: (p.relative_to(nbs).parent.parts, p.name != 'index.ipynb', p.name))


def nb_title(nb, default: str) -> str:
    "The notebook's title: the text of its first markdown heading (markdown markup removed), else `default`."
    for cell in nb.cells:
        if cell.cell_type != 'markdown': continue
        m = _re_heading.search(cell.source)
        if m: return re.sub(r'`|\*\*', '', m.group(1)).strip() or default
    return default


def directives(src: str):
    "nbdev directives at the top of a code cell ({name: value}) and the source without those lines."
    lines, d = src.splitlines(), {}
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _re_directive.match(line)
        if m:
            k, _, v = m.group(1).partition(' ')
            if k: d[k.rstrip(':').lower()] = v.strip().lower()
        elif line.strip(): break
        i += 1
    return d, '\n'.join(lines[i:]).strip('\n')


def _false(v): return v in ('false', 'no', '0')


def doc_cells(nb):
    "The cells nbdev would show, with the directive lines stripped from the code (changes `nb` in place)."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'code':
            d, src = directives(cell.source)
            if 'hide' in d or 'default_exp' in d or _false(d.get('include', '')): continue
            cell.source = src
            if _false(d.get('output', '')): cell.outputs = []
            if _false(d.get('echo', '')): cell.transient = {'remove_source': True}
            if not src.strip() and not cell.outputs: continue
        elif cell.cell_type == 'raw' or not cell.source.strip(): continue
        cells.append(cell)
    nb.cells = cells
    return nb


def count_images(nb) -> int:
    "Number of figures a page of `nb` shows: image outputs of the shown cells plus markdown images (after `doc_cells`)."
    n = 0
    for cell in nb.cells:
        if cell.cell_type == 'markdown':
            n += len(re.findall(r'!\[[^\]]*\]\([^)]+\)|<img\s', cell.source))
        else:
            n += sum(any(k.startswith('image/') for k in o.get('data', {})) for o in cell.get('outputs', []))
    return n


CSS = """
#fgssl-nav{position:fixed;top:0;left:0;bottom:0;width:17rem;overflow-y:auto;box-sizing:border-box;padding:1rem .8rem;
  background:#f7f7f9;border-right:1px solid #ddd;font:14px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
#fgssl-nav .site{display:block;font-size:1.25rem;font-weight:600;color:#222;text-decoration:none;margin-bottom:.2rem}
#fgssl-nav .desc{color:#666;font-size:.8rem;margin:0 0 .8rem}
#fgssl-nav ol{list-style:none;margin:0;padding:0}
#fgssl-nav li a{display:block;padding:.25rem .4rem;border-radius:4px;color:#2a5db0;text-decoration:none}
#fgssl-nav li a:hover{background:#e8eef8}
#fgssl-nav li a.current{background:#2a5db0;color:#fff}
body.jp-Notebook{margin:0;padding:0}
body.jp-Notebook > main{margin-left:17rem;padding:1rem 2rem;max-width:1200px;min-width:0}
body.jp-Notebook > main .highlight pre, body.jp-Notebook > main .jp-OutputArea-output pre{overflow-x:auto}
body.jp-Notebook > main .jp-RenderedMarkdown pre{background:#f5f5f7;padding:.5em .7em;border-radius:4px;overflow-x:auto}
@media (max-width:800px){#fgssl-nav{position:static;width:auto;border-right:0;border-bottom:1px solid #ddd}
  body.jp-Notebook > main{margin-left:0}}
"""

# extends nbconvert's `lab` template: no require.js (no widgets here), MathJax loaded after the page (so a machine
# without network shows the page at once; the TeX stays as written there), no mermaid, and the navigation sidebar.
TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({tex2jax: {inlineMath: [['$','$'], ['\\(','\\)']], displayMath: [['$$','$$'], ['\\[','\\]']],
  processEscapes: true, processEnvironments: true}, messageStyle: 'none'});
</script>
<script>window.addEventListener('load', function () {
  var s = document.createElement('script'); s.src = {{ resources.fgssl_mathjax_url | tojson }}; document.head.appendChild(s); });
</script>
{%- endblock html_head_js_mathjax -%}
{%- block extra_css -%}<style>{{ resources.fgssl_css }}</style>{%- endblock extra_css -%}
{%- block body_header -%}
{{ super() }}
{{ resources.fgssl_nav }}
{%- endblock body_header -%}
"""


def nav_html(pages, current, site_title, description) -> str:
    "The sidebar: the site title (links to the index), then every page, in order, the current one highlighted."
    here = current.parent
    rel = lambda p: os.path.relpath(p, here).replace(os.sep, '/')
    items = ''.join(f'<li><a href="{html.escape(rel(out))}"{" class=current" if out == current else ""}>'
                    f'{html.escape(title)}</a></li>' for out, title in pages)
    index = rel(pages[0][0]) if pages else 'index.html'
    return (f'<nav id="fgssl-nav"><a class="site" href="{html.escape(index)}">{html.escape(site_title)}</a>'
            f'<p class="desc">{html.escape(description)}</p><ol>{items}</ol></nav>')


_exporter = None
def _same(s): return s


def _render(job):
    "Render one notebook (worker process): returns (output path, number of figures)."
    nb_path, out_path, title, pages, site_title, description, mathjax = job
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    nb = doc_cells(nbformat.read(nb_path, as_version=4))
    global _exporter
    if _exporter is None:
        # filters={'clean_html': ...}: the notebooks are this project's own, trusted like Jupyter trusts them; bleach
        # on every highlighted cell would double the build time (Quarto does not sanitize either)
        _exporter = HTMLExporter(template_name='lab', extra_loaders=[DictLoader({'fgssl.html.j2': TEMPLATE})],
                                 template_file='fgssl.html.j2', embed_images=True, filters={'clean_html': _same},
                                 exclude_input_prompt=True, exclude_output_prompt=True)
    ex = _exporter
    resources = {'metadata': {'name': title, 'path': str(Path(nb_path).parent)},
                 'fgssl_css': CSS, 'fgssl_mathjax_url': mathjax,
                 'fgssl_nav': nav_html(pages, Path(out_path), site_title, description)}
    body, _ = ex.from_notebook_node(nb, resources=resources)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(body, encoding='utf-8')
    return out_path, count_images(nb)


def _clear(out: Path, root: Path):
    "Remove an old site at `out`; refuses folders that hold the project or something other than a site."
    if not out.exists(): return
    nbs = (root / settings(root).get('nbs_path', 'nbs')).resolve()
    if out == root.resolve() or out in nbs.parents or out == nbs or (out.is_dir() and any(out.iterdir())
                                                                     and not (out / 'index.html').exists()):
        raise SystemExit(f'refusing to delete {out}: not an old docs site (no index.html), or it holds the project')
    shutil.rmtree(out) if out.is_dir() else out.unlink()


def build_fallback(out: Path, root: Path = ROOT, jobs: int = 0, quiet: bool = False) -> Path:
    "Render every notebook of nbs/ into `out` with nbconvert; returns the path of index.html."
    import nbformat
    cfg = settings(root)
    nbs = root / cfg.get('nbs_path', 'nbs')
    out = Path(out).resolve()
    files = notebooks(nbs)
    if not files: raise SystemExit(f'no notebooks in {nbs}')
    pages = []
    for f in files:
        nb = nbformat.read(f, as_version=4)
        pages.append((out / f.relative_to(nbs).with_suffix('.html'), nb_title(nb, f.stem)))
    site_title, description = cfg.get('title', cfg.get('lib_name', 'docs')), cfg.get('description', '')
    _clear(out, root)
    out.mkdir(parents=True)
    mj = local_mathjax(out)  # shipped with the site; the CDN only where the package is missing
    if mj is None: print('note: jupyter-server-mathjax is not installed: the pages load MathJax from a CDN (math needs the network)')
    mj_url = lambda o: MATHJAX_URL if mj is None else Path(os.path.relpath(mj, Path(o).parent)).as_posix() + MATHJAX_CONFIG
    jobs_ = [(str(f), str(o), t, pages, site_title, description, mj_url(o)) for f, (o, t) in zip(files, pages)]
    # a worker costs ~2 s of imports; on a 2-core machine one process is as fast
    cpus = os.cpu_count() or 1
    jobs = jobs or (1 if cpus <= 2 else min(len(files), cpus // 2, 4))
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool: results = list(pool.map(_render, jobs_))
    else: results = [_render(j) for j in jobs_]
    (out / '.nojekyll').touch()  # so GitHub pages serves the folder as is
    if not quiet:
        for (o, n), f in zip(results, files): print(f'  {f.relative_to(root)} -> {Path(o).relative_to(out)} ({n} figures)')
    return out / 'index.html'


def build_quarto(out: Path, root: Path = ROOT) -> Path:
    "Run `nbdev_docs` (Quarto); keeps README.md as it was and moves the site to `out` when that is not `doc_path`."
    cfg = settings(root)
    doc_path = (root / cfg.get('doc_path', '_docs')).resolve()
    readme, nbdev_yml = root / 'README.md', root / cfg.get('nbs_path', 'nbs') / 'nbdev.yml'
    saved = readme.read_bytes() if readme.exists() else None
    had_yml = nbdev_yml.exists()
    exe = shutil.which('nbdev_docs', path=f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}')
    try: subprocess.run([exe or 'nbdev_docs'], cwd=root, check=True)
    finally:
        # nbdev_docs re-renders README.md with Quarto; the project's README comes from scripts/make_readme.py
        if saved is not None and readme.read_bytes() != saved: readme.write_bytes(saved)
        if not had_yml and nbdev_yml.exists(): nbdev_yml.unlink()  # regenerated from settings.ini by every run
    out = Path(out).resolve()
    if out != doc_path:
        _clear(out, root)
        shutil.move(str(doc_path), str(out))
    return out / 'index.html'


def main(argv=None):
    cfg = settings()
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', type=Path, default=None, help=f"output folder (default: settings.ini doc_path, {cfg.get('doc_path', '_docs')})")
    ap.add_argument('--fallback', action='store_true', help='use nbconvert even where Quarto is installed')
    ap.add_argument('--jobs', type=int, default=0, help='worker processes of the nbconvert build (default: 1 on <= 2 cores, else up to 4)')
    a = ap.parse_args(argv)
    out = a.out if a.out is not None else ROOT / cfg.get('doc_path', '_docs')
    t0 = time.time()
    if shutil.which('quarto') and not a.fallback:
        print('Quarto found: running nbdev_docs')
        index = build_quarto(out)
    else:
        print('Quarto not found: rendering the notebooks with nbconvert (stored outputs, nothing executed)'
              if not a.fallback else 'rendering the notebooks with nbconvert (stored outputs, nothing executed)')
        index = build_fallback(out, jobs=a.jobs)
    print(f'docs built in {time.time() - t0:.1f} s: {index}')
    print(f'open it in a browser: {index.as_uri()}  (e.g. `xdg-open {index}`; or serve the folder: '
          f'`python -m http.server -d {index.parent} 8000` and open http://localhost:8000/)')


if __name__ == '__main__':
    main()
