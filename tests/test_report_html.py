"""report.html: what each pipeline puts on the page, that it is self-contained, and that a browser shows it.

The browser tests open the page in headless Chromium (Debian's ``chromium`` driven by playwright;
``./dev`` installs both where it can) and skip with the reason when either is missing.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from models import build

import shear
from shear.report import SECTIONS, ReportData, render

LORASHEAR = (
    "lora{r=4},discover-groups,"
    "knowledge-distribution{max_windows=1,seq_len=32,gamma=0.3,kinds=[channel,head]},"
    "lhspg{ratio=0.3,periods=2,steps_per_period=2,warmup=1,batch_size=1,seq_len=32,lr=0.002,kinds=[channel,head]},"
    "erase,"
    "recover-dynamic{max_rounds=1,steps_per_round=1,batch_size=1,seq_len=32,eval_windows=1},"
    "merge-lora"
)
SCREEN_PT = (1600.0, 1000.0)


def _self_contained(page: str) -> None:
    """No file or address the page would fetch: no <link>, no src=, no http(s) but SVG namespaces."""
    assert "<link" not in page and " src=" not in page and "@import" not in page
    addresses = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert addresses <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink",
                         "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd"}, addresses  # fmt: skip


def _sections(page: str) -> dict[str, str]:
    out = {}
    for sid, _ in SECTIONS:
        m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
        assert m, f"section {sid} missing"
        out[sid] = m.group(1)
    return out


@pytest.fixture(scope="module")
def lorashear_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from shear.data import TextData
    from shear.zoo import load_tiny_llama

    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=20_000, max_val_chars=3_000, instructions=16)
    path = tmp_path_factory.mktemp("report") / "report.html"
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    small = shear.compile(model, LORASHEAR, example_inputs=ids, data=data, verify=1e-4, report=path)
    return path, small.shear_report


def test_empty_report_says_not_run() -> None:
    page = render(ReportData(title="nothing ran"))
    parts = _sections(page)
    for sid in ("passes", "verification", "widths", "knowledge", "lhspg", "recovery", "quality", "ir"):
        assert "not run" in parts[sid], sid
    _self_contained(page)


def test_compile_writes_a_report_of_a_baseline(tmp_path: Path) -> None:
    model, inputs = build("llama")
    path = tmp_path / "out" / "report.html"
    small = shear.compile(model, "random{ratio=0.3,seed=0},erase", example_inputs=inputs, report=path)
    page = path.read_text()
    _self_contained(page)
    parts = _sections(page)
    assert "not run" in parts["knowledge"] and "not run" in parts["lhspg"] and "not run" in parts["recovery"]
    assert "erase" in parts["verification"] and "max |diff|" in parts["verification"]
    details = small.shear_report.details
    mlp = next(r for r in details.widths if r.label == "mlp: channels")
    assert mlp.before == [96, 96] and all(a is not None and a < 96 for a in mlp.after)
    assert (
        "kv heads" in parts["widths"]
        and "query heads" in parts["widths"]
        and 'class="chart heatmap"' in parts["widths"]
    )
    assert "<svg" in parts["ir"] and "sg-model_layers_x_mlp_channel" in parts["ir"]
    assert ">mlp/channel (channel)</li>" in parts["ir"] and ">residual (residual)</li>" in parts["ir"]
    assert path.stat().st_size < 200_000
    assert "details" not in small.shear_report.to_dict()


def test_lorashear_report_has_every_stage(lorashear_report) -> None:
    path, report = lorashear_report
    page = path.read_text()
    _self_contained(page)
    parts = _sections(page)
    for sid in ("passes", "verification", "widths", "knowledge", "lhspg", "recovery", "ir"):
        assert "not run" not in parts[sid], sid
    assert "not run" in parts["quality"]  # perplexity and generations are the caller's (the demo's)
    assert 'class="chart bars"' in parts["knowledge"] and "unprunable" in parts["knowledge"]
    assert "Protected node groups" in parts["knowledge"] and "Δ perplexity</th>" in parts["knowledge"]
    assert "stopped: pretrain: " in parts["recovery"]
    assert "LHSPG loss per step" in parts["lhspg"] and "structures moved" in parts["lhspg"]
    assert "perplexity per source" in parts["recovery"] and "source mixture" in parts["recovery"]
    assert "LoRA r=4" in html.unescape(parts["ir"])  # the LoRA-wrapped IR the pipeline pruned
    # group sizes follow the weights through the LoRA wrapper and its merge
    mlp = [g for g in report.groups if g.name.endswith("mlp/channel")]
    assert mlp and sum(g.size_after for g in mlp) < sum(g.size_before for g in mlp)
    assert any(a != b for r in report.details.widths for a, b in zip(r.after, r.before))
    assert path.stat().st_size < 2_000_000


def test_report_of_a_70b_plan_on_the_meta_device(tmp_path: Path) -> None:
    """Tracing a LLaMA-70B shape on the meta device: the report renders, its drawing fits a screen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    path = tmp_path / "report.html"
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    shear.compile(model, "discover-groups", example_inputs=ids, verify=False, report=path)
    page = path.read_text()
    _self_contained(page)
    parts = _sections(page)
    assert parts["widths"].count('<rect class="cell"') == 3 * 80
    if shutil.which("dot"):
        m = re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', parts["ir"])
        assert m and float(m.group(1)) <= SCREEN_PT[0] and float(m.group(2)) <= SCREEN_PT[1]
        assert "x 79 identical (layers 1-79)" in html.unescape(parts["ir"])
    assert path.stat().st_size < 500_000


# -- in a real browser ------------------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _browser() -> Any:
    """A started playwright and a launched headless Chromium, or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; ./dev test installs it)")
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; ./dev test installs it)")
    pw = sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is a reason to skip, said as such
        pw.stop()
        pytest.skip(f"Chromium at {exe} did not start: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def test_report_in_headless_chromium(lorashear_report, tmp_path: Path) -> None:
    path, _ = lorashear_report
    pw, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        for sid, heading in SECTIONS:
            section = page.locator(f"section#{sid}")
            assert section.is_visible(), sid
            assert section.locator("h2").inner_text() == heading
        for sid, chart in (
            ("widths", "heatmap"),
            ("knowledge", "bars"),
            ("lhspg", "lines"),
            ("recovery", "lines"),
        ):
            box = page.locator(f"section#{sid} svg.chart.{chart}").first.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 50, (sid, box)
        drawing = page.locator("#ir-drawing svg").bounding_box()
        assert drawing and drawing["width"] > 300
        # hovering a node of the MLP group lights up every member of the group, and only those
        node = page.locator("#ir-drawing g.node[class*='mlp_channel']").first
        cls = next(c for c in (node.get_attribute("class") or "").split() if c.startswith("sg-"))
        members = page.locator(f"#ir-drawing g.node.{cls}").count()
        assert members == 3  # gate_proj, up_proj, down_proj
        node.scroll_into_view_if_needed()
        node.hover()
        assert page.locator(f"#ir-drawing g.node.{cls}.hl").count() == members
        assert page.locator("#ir-drawing g.node.hl").count() == members
        assert "3 nodes highlighted" in page.locator("#ir-hover").inner_text()
        page.screenshot(path=str(tmp_path / "ir-hover.png"))
        # the legend highlights too
        page.locator(".legend li[data-group*='self_attn_head']").hover()
        assert page.locator("#ir-drawing g.node.hl").count() == 4  # q, k, v, o of the kv family
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        assert (tmp_path / "report.png").stat().st_size > 10_000
        assert not errors, errors
        assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    finally:
        browser.close()
        pw.stop()


def test_a_report_that_cannot_be_written_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report path that is checked fine but fails at the write (a full disk) costs the report, not the model."""
    def full_disk(details: object, path: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shear.report.write_html", full_disk)
    model, inputs = build("llama")
    small = shear.compile(model, "random{ratio=0.3,seed=0},erase", example_inputs=inputs, report=tmp_path / "r.html")
    assert small.shear_report.params_after < small.shear_report.params_before  # the model is still returned
    assert any(w.startswith("report: could not write") and "No space left" in w for w in small.shear_report.warnings)
    assert not (tmp_path / "r.html").exists()
