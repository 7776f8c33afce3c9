"""The check-line protocol of the SDK and raw test clients (awsiot_shadow.py,
awsiot_jobs.py, shadow_raw.py): one line per check, `ok NAME detail` or
`fail NAME detail`; exit 0 only if every check passed."""

import sys

failures = []


def check(name, ok, detail=""):
    print(("ok" if ok else "fail"), name, detail, flush=True)
    if not ok:
        failures.append(name)


def run(fn, args):
    """Runs fn(args); an unexpected exception is a failed check with its reason."""
    try:
        fn(args)
    except Exception as e:
        check("unexpected", False, "%s: %s" % (type(e).__name__, e))
    sys.exit(1 if failures else 0)
