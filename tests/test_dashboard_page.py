"""The dashboard page in headless Chromium against the router's own HTTP server (uvicorn on
a loopback port, tests/routerserver.py) over a cluster control whose replicas start at
once: no Ray, so the page's own behaviour is what is tested, in seconds. The whole stack's
page test (tests/test_stack.py) drives the same page over Serve."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from browser import dashboard, page_state, scale_from_page, wait_for_text
from redisserver import running
from routerserver import RouterServer

from router.admin import DeploymentStatus, ReplicaStatus

TOKEN = "page-test-token"


@dataclass
class InstantControl:
    """A cluster whose replicas are RUNNING as soon as they are asked for."""

    target: int = 2
    asked: list[int] = field(default_factory=list)

    async def deployment(self) -> DeploymentStatus:
        running = tuple(ReplicaStatus(f"replica-{i}", "RUNNING") for i in range(self.target))
        return DeploymentStatus(self.target, running, "HEALTHY")

    async def request_scale(self, target: int) -> None:
        self.asked.append(target)
        self.target = target


@pytest.fixture
def page_router(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, InstantControl]]:
    monkeypatch.setenv("TPSERVE_ADMIN_TOKEN", TOKEN)
    control = InstantControl()
    with running() as redis:
        server = RouterServer(None, redis.url(), control, max_replicas=8).start()
        try:
            yield server.url, control
        finally:
            server.stop()


def test_a_poll_between_clearing_the_box_and_typing_leaves_the_box_to_the_user(
        page_router: tuple[str, InstantControl]) -> None:
    """Clearing the scale box fires no `input` event and leaves it unfocused; a poll that
    lands before the user types must not write the target back into it (CI typed "3"
    after such a poll and pressed Scale on "23", which the page refused). Until the box is
    edited, and again after a scale, it follows Serve's target (a CLI scale shows). A
    count the admin API would refuse is refused on the page, saying the range the admin
    API reports (this router's max_replicas, not the page's default)."""
    from selenium.webdriver.common.by import By

    url, control = page_router
    with dashboard(url, TOKEN, wait_s=120) as (driver, wait):
        wait_for_text(driver, wait, "replica-count", "2 replicas running (target 2)")
        driver.find_element(By.ID, "scale-input").clear()
        before = driver.find_element(By.ID, "poll-status").text
        wait.until(lambda d: d.find_element(By.ID, "poll-status").text != before,
                   f"no poll after the clear: {page_state(driver)}")
        assert driver.find_element(By.ID, "scale-input").get_attribute("value") == ""
        scale_from_page(driver, 3)
        wait_for_text(driver, wait, "replica-count", "3 replicas running (target 3)")
        assert control.asked == [3]
        control.target = 5  # as `tpserve scale 5` would
        wait_for_text(driver, wait, "replica-count", "5 replicas running (target 5)")
        wait.until(lambda d: d.find_element(By.ID, "scale-input").get_attribute("value")
                   == "5", f"the box did not follow the target: {page_state(driver)}")
        for refused in (0, 9):  # the admin API takes 1 to this router's max_replicas, 8
            scale_from_page(driver, refused)  # (the page's default is 16): refused there
            wait_for_text(driver, wait, "scale-status", "enter a whole number from 1 to 8")
        assert driver.find_element(By.ID, "scale-input").get_attribute("max") == "8"
        assert control.asked == [3]
