"""The server's page (ddlm/serve/static/index.html) in a real browser: Debian's headless Chromium driven by
selenium through the packaged chromedriver (`apt-get install chromium chromium-driver`; .ci/run installs
them). The page takes a prompt and settings, streams a generation and draws each canvas: masked positions
visibly masked, the step counter, then the text the API gives for the same request."""

import json
import shutil
import urllib.request

import pytest
from serve_utils import SEQ_LEN, running, tiny_engine, tiny_workdir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and its driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tiny_workdir(tmp_path_factory.mktemp("browser") / "dit", "mdlm")
    with running(tiny_engine(workdir, batch_sizes=(1,))) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, script, timeout=120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def _api_text(server, body):
    request = urllib.request.Request(
        server.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["choices"][0]


@pytest.mark.parametrize("sampler", ["ancestral", "parallel"])
def test_the_page_draws_the_canvases_filling_in_and_the_text(server, browser, sampler):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server.url + "/")
    _wait(browser, "return document.getElementById('model').textContent.startsWith('tiny')")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("Hi")
    Select(browser.find_element(By.ID, "sampler")).select_by_value(sampler)
    for field, value in (("seed", "5"), ("steps", "8"), ("block_length", "4"), ("temperature", "0.9")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "go").click()
    _wait(browser, "return window.ddlm.done || window.ddlm.error !== ''")
    state = browser.execute_script("return window.ddlm")
    assert state["error"] == "" and state["done"]
    # Several canvases were drawn, the first with every generated position masked (shown as masked cells), and
    # the status line counted the steps.
    generated = SEQ_LEN - 2
    assert state["frames"] >= 3 and state["maskedFrames"] >= 2
    assert state["firstFrame"].count('<span class="m">') == generated
    assert state["firstStatus"] == f"step 1 · {generated} of {generated} positions still masked"
    # The last canvas is the answer: nothing masked, and the text below it is the API's for the same request.
    assert browser.find_elements(By.CSS_SELECTOR, "#canvas .m") == []
    ddlm = {"sampler": sampler, "block_length": 4, "steps": 8} if sampler == "parallel" else {}
    expected = _api_text(server, {"prompt": "Hi", "seed": 5, "temperature": 0.9, "ddlm": ddlm})
    assert state["text"] == expected["text"]
    status = browser.find_element(By.ID, "status").text
    assert status.startswith(f"done ({expected['finish_reason']}, {expected['ddlm']['nfe']} network calls")
    # The masked cells are drawn differently from the decoded ones (the page's stylesheet).
    masked_style = browser.execute_script(
        "const s = document.createElement('span'); s.className = 'm'; document.getElementById('canvas')"
        ".appendChild(s); const c = getComputedStyle(s).backgroundColor; s.remove(); return c;"
    )
    plain_style = browser.execute_script(
        "return getComputedStyle(document.getElementById('canvas')).backgroundColor"
    )
    assert masked_style != plain_style
