"""The page for people (service/static/ui.html) in a real headless Chromium driven by Selenium, against
``bentoml serve`` with the tiny test models: what it shows must be what the API answers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from loadtest.server import serve
from training.data import load_cifar
from utils import ModelRef

pytestmark = pytest.mark.heavy

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MODELS = [ModelRef("tiny", "tiny-fp32:latest"), ModelRef("tiny-int8", "tiny-int8:latest")]
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1000,800")
TOP_K = 3  # the page's default
# What the page shows, per image card: {file, disagree, answers: {model: [labels] or the error message}, timings}.
SHOWN = """return [...document.querySelectorAll('#results > .card')].map(card => ({
  file: card.dataset.file, disagree: card.classList.contains('disagree'),
  answers: Object.fromEntries([...card.querySelectorAll('.answer')].map(a => [a.dataset.model,
    a.querySelector('.error')?.textContent ?? [...a.querySelectorAll('.label')].map(l => l.textContent)])),
  timings: [...card.querySelectorAll('.timing')].map(t => t.textContent)}))"""


@pytest.fixture(scope="module")
def url(exported, tmp_path_factory):
    with serve(MODELS, tmp_path_factory.mktemp("serve"), {"intra_op_threads": 1}, timeout=90) as url:
        yield url


def chromium(profile: Path) -> webdriver.Chrome:
    """Debian's headless Chromium through chromium-driver, with a fresh profile and nothing fetched from outside;
    skips, saying why, where either is missing."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("BROWSER TEST NOT RUN: Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; `make test` does it when run as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    drv = chromium(tmp_path_factory.mktemp("chromium"))
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def photos(synthetic_dir, tmp_path_factory) -> list[Path]:
    """Two CIFAR-10 test images (the shared subset, else the synthetic set) as 256 px JPEG photos, and a text file."""
    real = (SHARED_DATA / "cifar-10-batches-py" / "test_batch").exists()
    data = load_cifar(SHARED_DATA if real else synthetic_dir, download=False)
    folder = tmp_path_factory.mktemp("photos")
    paths = [folder / f"{data.classes[data.test_y[i]]}-{i}.jpg" for i in (0, 1)]
    for i, path in enumerate(paths):
        Image.fromarray(data.test_x[i]).resize((256, 256), Image.BICUBIC).save(path, quality=90)
    (folder / "notes.txt").write_text("not an image")
    return [*paths, folder / "notes.txt"]


def api(url: str, path: Path, model: str) -> list[str] | str:
    """The labels the API answers for ``path``, or its error message."""
    r = httpx.post(f"{url}/classify", files={"image": (path.name, path.read_bytes())},
                   data={"model": model, "top_k": TOP_K}, timeout=30)
    return [p["label"] for p in r.json()["predictions"]] if r.status_code == 200 else r.json()["error"]


def wait_for_answers(drv: webdriver.Chrome, answers: int) -> list[dict]:
    """The cards once the page has shown ``answers`` answers (one per image and model) and is idle."""
    def done(d):
        return (d.find_element(By.ID, "results").get_attribute("aria-busy") == "false"
                and len(d.find_elements(By.CSS_SELECTOR, "#results .answer")) == answers)
    WebDriverWait(drv, 20).until(done)
    return drv.execute_script(SHOWN)


def save_page(drv: webdriver.Chrome, path: Path) -> None:
    """A screenshot of the whole page: the window grows to the page's height first."""
    chrome = drv.execute_script("return window.outerHeight - window.innerHeight")
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(drv.get_window_size()["width"], chrome + height)
    drv.save_screenshot(str(path))


def test_page_shows_what_the_api_answers_alone_and_side_by_side(browser, url, photos, tmp_path):
    browser.get(url)
    WebDriverWait(browser, 10).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    options = [o.text for o in Select(browser.find_element(By.ID, "model")).options]
    assert re.fullmatch(r"tiny \(FP32, onnxruntime, accuracy \d+\.\d%\)", options[0]), options
    assert options[1].startswith("tiny-int8 (INT8, onnxruntime, accuracy ")
    # keyboard: every control is labelled, and the first Tab reaches the (real) file input
    assert browser.execute_script("return [...document.querySelectorAll('input, select')]"
                                  ".every(e => e.labels.length || e.ariaLabel)")
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element.get_attribute("id") == "files"

    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, photos)))  # two photos and a text file
    cards = wait_for_answers(browser, len(photos))
    assert [c["answers"] for c in cards] == [{"tiny": api(url, p, "tiny")} for p in photos]
    assert isinstance(cards[-1]["answers"]["tiny"], str)  # the text file: the service's own error message
    assert all(re.match(r"server \d+\.\d ms \(decode", t) for c in cards[:2] for t in c["timings"])

    browser.find_element(By.ID, "compare").click()  # the second model defaults to another precision: INT8
    cards = wait_for_answers(browser, 2 * len(photos))
    expected = [{m.name: api(url, p, m.name) for m in MODELS} for p in photos]
    assert [c["answers"] for c in cards] == expected
    assert [c["disagree"] for c in cards[:2]] == [a["tiny"][0] != a["tiny-int8"][0] for a in expected[:2]]

    save_page(browser, tmp_path / "ui.png")
    with Image.open(tmp_path / "ui.png") as shot:
        assert shot.width >= 1000 and shot.height >= 800


def test_page_is_self_contained_and_the_openapi_docs_stay_reachable(url):
    page = httpx.get(url)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and not re.search(r"https?:|(src|href)=", page.text)  # nothing from elsewhere
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 200 and "docs.json" in docs.text and not re.search(r"https?://", docs.text)
    for asset in re.findall(r"static_content/[\w.-]+", docs.text):
        assert httpx.get(f"{url}/{asset}").status_code == 200, asset
    spec = httpx.get(f"{url}/docs.json").json()
    assert {"/classify", "/classify_batch", "/models"} <= set(spec["paths"]) and "/" not in spec["paths"]


def test_swagger_ui_renders_at_docs_from_local_assets(browser, url):
    browser.get(f"{url}/docs")
    WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.strip() for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/classify", "/classify_batch", "/models"} <= paths, paths
