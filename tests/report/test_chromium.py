"""Open report.html in headless Chromium, offline, and check that the page and every image load.

The product page carries no script. The test renders a COPY of it with a small probe appended
(and `script-src 'unsafe-inline'` added to the copy's CSP so the probe may run): on load the probe
writes into document.title how many <img> decoded (naturalWidth > 0), how many non-data: resources
were fetched, how many CSP violations fired, and whether the page overflows horizontally.
`--dump-dom` then prints the DOM, title included.

Needs Debian's `chromium` (`.ci/install_chromium.sh` installs it); skipped when it is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (/usr/bin/chromium absent; "
                                                         "run .ci/install_chromium.sh)")

PROBE = """<script>
var kdlmViolations = 0;
document.addEventListener('securitypolicyviolation', function () { kdlmViolations += 1; });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; }).length;
  var external = performance.getEntriesByType('resource').filter(function (e) { return !/^data:/.test(e.name); }).length;
  var overflow = document.documentElement.scrollWidth > window.innerWidth ? 1 : 0;
  document.title = 'PROBE images ' + ok + '/' + imgs.length + ' external ' + external + ' violations ' + kdlmViolations +
                   ' tables ' + document.querySelectorAll('table').length + ' overflow ' + overflow;
});
</script>
"""


def probe(page: str, tmp_path: Path) -> dict[str, str]:
    """Render a probed copy of `page` in headless Chromium, offline; the probe's fields (images, external, ...)."""
    csp = "default-src 'none';"
    assert csp in page
    probe_page = page.replace(csp, csp + " script-src 'unsafe-inline';", 1).replace("</body>", PROBE + "</body>", 1)
    copy = tmp_path / "probe.html"
    copy.write_text(probe_page, encoding="utf-8")

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000", "--virtual-time-budget=5000",
           "--dump-dom", copy.as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}  # chromium writes its caches under HOME
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    match = re.search(r"<title>(PROBE [^<]*)</title>", proc.stdout)
    assert match, f"no probe title in chromium output (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return dict(re.findall(r"(\w+) (\S+)", match.group(1).removeprefix("PROBE ")))


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    fields = probe(full_report.html, tmp_path)
    assert fields["images"] == "5/5"
    assert fields["external"] == "0" and fields["violations"] == "0"
    assert int(fields["tables"]) >= 8
    assert fields["overflow"] == "0"  # wide tables scroll inside their own box, not the page


def test_compare_report_renders_in_headless_chromium(tmp_path):
    from kdlm.report import make_report

    from .test_compare_section import compare_dict, write_compare_folder

    compare = compare_dict()  # widen the main table past the page: 5 more columns of long interval cells
    for i in range(5):
        key = f"extra{i}/rouge_l"
        compare["metrics"].insert(1, {"key": key, "task": f"extra{i}", "metric": "rouge_l", "higher_is_better": True,
                                      "group": "task", "label": f"Extra task {i} ROUGE-L"})
        for name, cells in compare["table"].items():
            cells[key] = dict(cells["selfinst/rouge_l"])
    folder = write_compare_folder(tmp_path / "cmp", compare)
    _, html_path = make_report([folder], tmp_path / "report", title="compare <grid>")
    fields = probe(html_path.read_text(), tmp_path)
    assert fields["images"] == "1/1"  # the training curves
    assert fields["external"] == "0" and fields["violations"] == "0"
    assert fields["tables"] == "4"  # main, retention, efficiency, training
    assert fields["overflow"] == "0"
