"""The documentation site: nbs/_quarto.yml and nbs/sidebar.yml for `nbdev_docs` (Quarto), and the offline fallback of
scripts/make_docs.py (nbconvert), built in full into a temporary folder and opened in headless Chromium.

The Chromium part needs a browser binary (Debian: `apt-get install -y --no-install-recommends chromium-headless-shell`;
or set FGSSL_CHROMIUM=/path/to/chrome) and is skipped without one. FGSSL_DOCS_SHOTS=DIR keeps copies of its screenshots."""
import os, re, shutil, subprocess, sys, time
from glob import glob
from pathlib import Path
import nbformat, pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
_re_nav = re.compile(r'<nav id="fgssl-nav">(.*?)</nav>', re.S)


def _expected_pages():
    "(notebook file name, title) in nbdev's sidebar order: index.ipynb first, then by name; title = first # heading."
    names = sorted(p.name for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    names = sorted(names, key=lambda n: n != 'index.ipynb')
    out = []
    for n in names:
        nb = nbformat.read(NBS / n, as_version=4)
        heads = [m.group(1) for c in nb.cells if c.cell_type == 'markdown'
                 for m in [re.search(r'^#+ +(.+?) *$', c.source, re.M)] if m]
        out.append((n, heads[0].replace('`', '') if heads else Path(n).stem))
    return out


def _hidden(cell):
    "nbdev leaves out `#| hide` and `#| default_exp` cells."
    first = [l for l in cell.source.splitlines() if l.strip().startswith('#|')]
    return cell.cell_type == 'code' and any(re.match(r'#\|\s*(hide|default_exp)\b', l.strip()) for l in first)


def _n_figures(nb):
    "Image outputs of the shown code cells, plus images in markdown."
    n = 0
    for c in nb.cells:
        if c.cell_type == 'markdown': n += len(re.findall(r'!\[[^\]]*\]\([^)]+\)', c.source))
        elif not _hidden(c): n += sum(any(k.startswith('image/') for k in o.get('data', {})) for o in c.outputs)
    return n


# --- the Quarto configuration --------------------------------------------------------------------------------------

def test_quarto_yml():
    q = yaml.safe_load((NBS / '_quarto.yml').read_text())
    test = q['project']['type'], q['website']['sidebar']['style'], q['metadata-files']
    assert test == ('website', 'floating', ['nbdev.yml', 'sidebar.yml']), test


def test_sidebar_lists_every_notebook_in_order():
    side = yaml.safe_load((NBS / 'sidebar.yml').read_text())['website']['sidebar']['contents']
    want = [n for n, _ in _expected_pages()]
    assert side == want, f'nbs/sidebar.yml is out of date (run `nbdev_sidebar`): {side} != {want}'


# --- the nbconvert fallback ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The full fallback site (every notebook; about 10-25 s on 2 busy cores)."
    out = tmp_path_factory.mktemp('docs') / 'site'
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'make_docs.py'), '--fallback', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(out / 'index.html') in r.stdout and (out / 'index.html').as_uri() in r.stdout, r.stdout
    print(f'fallback site of {len(_expected_pages())} notebooks built in {time.time() - t0:.1f} s')
    return out


def test_every_page_links_every_notebook(site):
    from bs4 import BeautifulSoup
    pages = _expected_pages()
    want = [(Path(n).with_suffix('.html').name, t) for n, t in pages]
    assert sorted(p.name for p in site.glob('*.html')) == sorted(h for h, _ in want)
    for html_name, _ in want:
        text = (site / html_name).read_text()
        nav = _re_nav.findall(text)
        assert len(nav) == 1, f'{html_name}: {len(nav)} navigation blocks'
        items = BeautifulSoup(nav[0], 'html.parser').select('li a')
        links = [(a['href'], a.get_text()) for a in items]
        assert links == want, (html_name, links)
        assert [a['href'] for a in items if 'current' in a.get('class', [])] == [html_name]
    # index.html is the index notebook
    assert '<h1' in (site / 'index.html').read_text() and pages[0][0] == 'index.ipynb'


def _figure_nb():
    "The notebook with the most figures (the test of loaded images wants several)."
    counts = [(_n_figures(nbformat.read(NBS / n, as_version=4)), n) for n, _ in _expected_pages()]
    n, name = max(counts, key=lambda c: c[0])
    assert n > 0, 'no notebook has a figure'
    return name, n


def test_cells_shown_like_nbdev(site):
    "Hidden cells left out, `#|` lines stripped from the code; every other code cell there, with its figures inline."
    from bs4 import BeautifulSoup
    name, n_fig = _figure_nb()
    nb = nbformat.read(NBS / name, as_version=4)
    soup = BeautifulSoup((site / Path(name).with_suffix('.html')).read_text(), 'html.parser')
    inputs = soup.select('.jp-CodeCell .jp-InputArea')
    shown = [c for c in nb.cells if c.cell_type == 'code' and not _hidden(c)
             and any(not l.strip().startswith('#|') and l.strip() for l in c.source.splitlines())]
    assert len(inputs) == len(shown), (len(inputs), len(shown))
    for i in inputs:
        assert not any(l.strip().startswith('#|') for l in i.get_text().splitlines()), i.get_text()[:200]
    imgs = soup.select('main img')
    assert len(imgs) == n_fig and all(i['src'].startswith('data:image/') for i in imgs), [i['src'][:30] for i in imgs]
    assert 'nbdev_export' not in ''.join(i.get_text() for i in inputs)  # the closing `#| hide` cell


# --- the pages in a browser ----------------------------------------------------------------------------------------

def _chromium():
    env = os.environ.get('FGSSL_CHROMIUM')
    if env: return env
    for n in ('chromium-headless-shell', 'chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(n): return shutil.which(n)
    for pat in ('/usr/lib/chromium*/chromium-headless-shell', '/usr/lib/chromium*/chromium', '/usr/lib/chromium*/chrome'):
        found = sorted(p for p in glob(pat) if os.access(p, os.X_OK))
        if found: return found[0]
    return None


PROBE = """<script>window.addEventListener('load', function () {
  var im = Array.from(document.images), ok = im.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var d = document.createElement('div'); d.id = 'fgssl-probe';
  d.setAttribute('data-total', im.length); d.setAttribute('data-loaded', ok.length); document.body.appendChild(d);
});</script>"""
# headless screenshots of a scrolled page come out blank: pull the page up (margin) to show its largest figure instead
SHIFT = """<script>window.addEventListener('load', function () {
  var im = Array.from(document.images); if (!im.length) return;
  var big = im.reduce(function (a, b) { return b.naturalWidth * b.naturalHeight > a.naturalWidth * a.naturalHeight ? b : a; });
  var top = big.getBoundingClientRect().top + window.scrollY;
  document.querySelector('main').style.marginTop = (-Math.max(0, top - 150)) + 'px';
});</script>"""


def _run_chromium(exe, tmp, *args):
    cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--no-first-run',
           f'--user-data-dir={tmp / "profile"}', '--window-size=1280,900', *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f'{" ".join(cmd)} failed:\n{r.stderr[-2000:]}'
    return r.stdout


def _probe(exe, tmp, page: Path, html_text: str):
    "(images, loaded images) of `html_text`, opened from `page`'s folder, after the load event."
    p = page.with_name('probe_' + page.name)
    p.write_text(html_text.replace('</body>', PROBE + '</body>'))
    dom = _run_chromium(exe, tmp, '--dump-dom', p.as_uri())
    m = re.search(r'<div id="fgssl-probe" data-total="(\d+)" data-loaded="(\d+)"', dom)
    assert m, 'the probe script did not report (page load never finished?)'
    p.unlink()
    return int(m.group(1)), int(m.group(2))


def _screenshot(exe, tmp, url, png):
    from PIL import Image, ImageStat
    _run_chromium(exe, tmp, f'--screenshot={png}', url)
    im = Image.open(png).convert('L')
    var = ImageStat.Stat(im).var[0]
    assert im.size == (1280, 900) and var > 200, f'{png}: {im.size}, pixel variance {var:.1f} (blank page?)'
    keep = os.environ.get('FGSSL_DOCS_SHOTS')
    if keep: Path(keep).mkdir(parents=True, exist_ok=True); shutil.copy(png, Path(keep) / Path(png).name)
    return var


def test_pages_in_chromium(site, tmp_path):
    exe = _chromium()
    if not exe: pytest.skip('no Chromium binary (chromium-headless-shell, chromium, chromium-browser, google-chrome on PATH '
                            'or in /usr/lib/chromium*/): apt-get install -y --no-install-recommends chromium-headless-shell')
    name, n_fig = _figure_nb()
    page = site / Path(name).with_suffix('.html')
    _screenshot(exe, tmp_path, (site / 'index.html').as_uri(), tmp_path / 'docs_index.png')
    text = page.read_text()
    assert _probe(exe, tmp_path, page, text) == (n_fig, n_fig), f'{page.name}: not every figure loaded'
    # the screenshot of the page around its largest figure
    shot_page = page.with_name('shot_' + page.name)
    shot_page.write_text(text.replace('</body>', SHIFT + '</body>'))
    _screenshot(exe, tmp_path, shot_page.as_uri(), tmp_path / f'docs_{Path(name).stem}.png')
    # the probe tells a broken figure from a loaded one
    broken = re.sub(r'src="data:image/png;base64,[^"]{8}', 'src="data:image/png;base64,AAAAAAAA', text, count=1)
    assert _probe(exe, tmp_path, page, broken) == (n_fig, n_fig - 1)


def test_math_renders_offline(site, tmp_path):
    "MathJax ships with the site (from the jupyter-server-mathjax package): the pages load it from the site's folder, no CDN, and it typesets."
    assert (site / 'mathjax' / 'MathJax.js').exists()
    page = site / '11_moco.html'
    text = page.read_text()
    assert 'cdnjs' not in text and 'mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full' in text
    assert '$$' in text  # the display formula of InfoNCE, for MathJax to typeset
    exe = _chromium()
    if not exe: pytest.skip('no Chromium binary: the typesetting itself is not checked')
    dom = _run_chromium(exe, tmp_path, '--virtual-time-budget=15000', '--dump-dom', page.as_uri())
    assert dom.count('class="MathJax_Display"') >= 1 and dom.count('class="MathJax"') > 3, 'MathJax did not typeset the page'
