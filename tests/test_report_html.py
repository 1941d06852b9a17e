"""report.html: the report in one self-contained file, its answers side by side, shown by a real
browser (headless Chromium, where installed: .ci/run installs Debian's package)."""
import json
import re
import shutil
import subprocess

import pytest

from core.files import read_jsonl
from stages.report import markdown_html, side_by_side


def test_markdown_tables_lists_and_images_become_html_with_the_image_embedded(tmp_path):
    (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    text = "# Run `tiny`\n\nHarm by **oracle**.\n\n- `a`: one\n- b\n\n| policy | x |\n|---|---|\n| sft | 0.5 <b> |\n\n![plot](p.png)\n"
    out = markdown_html(text, tmp_path)
    assert out.splitlines() == [
        "<h1>Run <code>tiny</code></h1>", "<p>Harm by <b>oracle</b>.</p>", "<ul><li><code>a</code>: one</li><li>b</li></ul>",
        "<table><thead><tr><th>policy</th><th>x</th></tr></thead><tbody><tr><td>sft</td><td>0.5 &lt;b&gt;</td></tr></tbody></table>",
        '<img alt="plot" src="data:image/png;base64,iVBORw0KGgpmYWtl">']


def test_side_by_side_takes_each_policys_first_answer_to_the_same_prompts():
    rows = [{"policy": p, "prompt": q, "harmful_prompt": h, "sample": s, "answer": f"{p} {q} {s}", "harmful": p == "sft",
             "refusal": False, "reward": 1.0, "cost": -1.0}
            for q, h in (("hurt?", True), ("bread?", False), ("steal?", True)) for p in ("sft", "safe_rlhf@1") for s in (0, 1)]
    chosen = side_by_side(rows, ["sft", "safe_rlhf@1"], per_kind=1)
    assert [(e["prompt"], e["unsafe"]) for e in chosen] == [("hurt?", True), ("bread?", False)]
    assert chosen[0]["answers"] == {"sft": ("sft hurt? 0", "harmful; reward 1.00, cost -1.00"),
                                    "safe_rlhf@1": ("safe_rlhf@1 hurt? 0", "reward 1.00, cost -1.00")}


@pytest.mark.slow
def test_the_runs_report_html_stands_alone_and_a_browser_shows_it(small_pipeline, tmp_path):
    stage = small_pipeline["run_dir"] / "stages" / "report"
    page = (stage / "report.html").read_text()
    evaluation = json.loads((small_pipeline["run_dir"] / "stages" / "evaluate" / "evaluation.json").read_text())
    # one file: every image inline, nothing fetched from elsewhere
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page
    for name in evaluation["policies"]:  # the policies' table, with the figures evaluate gave
        m = evaluation[name]
        lo, hi = m["harmful_rate_ci"]
        assert f"<td>{name}</td><td>{m['harmful_rate']:.3f} [{lo:.3f}, {hi:.3f}]</td>" in page
    samples = [r for r in read_jsonl(small_pipeline["run_dir"] / "stages" / "evaluate" / "samples.jsonl") if r["sample"] == 0]
    first = next(r for r in samples if r["harmful_prompt"] and r["policy"] == evaluation["policies"][-1])
    assert __import__("html").escape(first["answer"]) in page.split("Answers side by side")[1]

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's package): the page was not rendered")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1280,2000",
                    (stage / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000)
    # a page with text, tables and plots on it: many shades, mostly light; a blank or error page has one or two
    histogram = image.histogram()
    assert sum(1 for n in histogram if n > 50) > 20 and sum(histogram[200:]) > 0.5 * sum(histogram)
