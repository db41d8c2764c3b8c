"""The dashboard in headless Chromium (Debian's chromium and chromium-driver, installed by
`infra/install.sh --test`): the page opened with the admin token entered, and waits that
say what the page showed when they time out."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

# what the page says about scaling, read back when a wait on it times out
STATUS_IDS = ("replica-count", "scale-status", "poll-status", "auth-error")


@contextlib.contextmanager
def dashboard(edge: str, token: str, wait_s: float = 240.0) -> Iterator[tuple[Any, Any]]:
    """The dashboard at `edge`/dashboard with `token` entered: (driver, a `wait_s` wait)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (browser_path and driver_path):
        pytest.skip("needs Debian's chromium and chromium-driver (infra/install.sh --test)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                              options=options)
    try:
        driver.get(f"{edge}/dashboard")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "token-submit").click()
        yield driver, WebDriverWait(driver, wait_s, poll_frequency=0.5)
    finally:
        driver.quit()


def page_state(driver: Any) -> dict[str, str]:
    """The page's status lines and the scale box's value, as a user reads them."""
    from selenium.webdriver.common.by import By

    shown = {name: driver.find_element(By.ID, name).text for name in STATUS_IDS}
    return {**shown, "scale-input": driver.find_element(By.ID, "scale-input")
            .get_attribute("value") or ""}


def wait_for_text(driver: Any, wait: Any, element_id: str, text: str) -> None:
    """Wait until the element `element_id` shows `text`; on a timeout, fail saying what
    the page showed instead (its status lines and the scale box)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    try:
        wait.until(ec.text_to_be_present_in_element((By.ID, element_id), text))
    except TimeoutException:
        pytest.fail(f"#{element_id} never showed {text!r}; the page showed "
                    f"{page_state(driver)}")


def scale_from_page(driver: Any, replicas: int) -> None:
    """Type `replicas` into the scale box as a user does (clear it, type) and press Scale;
    the box must hold exactly what was typed when the button is pressed."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "scale-input")
    box.clear()
    box.send_keys(str(replicas))
    assert box.get_attribute("value") == str(replicas), page_state(driver)
    driver.find_element(By.ID, "scale-button").click()
