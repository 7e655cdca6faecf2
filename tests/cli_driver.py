"""Runs console-script commands (a JSON list of argv lists on stdin) one after another in this process, each as its
installed script would (`sys.exit(main())` with `sys.argv` set), stdout and stderr captured apart; prints the results as
JSON after a marker. Used by `cli_batch` in conftest.py.

- Python-level output only (`sys.stdout`, `sys.stderr`); what a library writes straight to file descriptor 2 goes to
  this process's stderr, which `cli_batch` requires to be empty.
- The commands share one process: a warning shown once per location, or an import-time message, appears only in
  the first command that triggers it.
- Keep the loop at the top level of this file and run it as a file (not `python -c`, not inside a function):
  fastcore's `call_parse` parses `sys.argv` only when called from the top level of a `__main__` script, and
  otherwise runs the function with its defaults (for `fgssl_pretrain`: a real training)."""
import contextlib, io, json, sys, traceback
from importlib.metadata import entry_points
scripts = {e.name: e for e in entry_points(group='console_scripts')}
res = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = list(argv)
        try: raise SystemExit(scripts[argv[0]].load()())
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int): rc = e.code or 0
            else: print(e.code, file=sys.stderr); rc = 1
        except BaseException: traceback.print_exc(); rc = 1
    res.append(dict(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue()))
sys.__stdout__.write('\n@@results@@' + json.dumps(res))
