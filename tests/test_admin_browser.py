"""The approvers' HTML page in a real browser (headless Chromium driven by Selenium).

One PDP (gRPC + admin endpoint) over SQLite for the module; an approver in ``support-leads`` and ``ops-oncall``; a
support agent owned by someone else. Each test makes proposals of its own and starts from a browser without cookies.

HTTP statuses come from the browser itself (``PerformanceNavigationTiming.responseStatus``): what the page the
approver ended up on was served with, after redirects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from conftest import TICKETS, Server, fresh_database, running_server
from selenium.common.exceptions import NoAlertPresentException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from pdp.client import PdpClient
from pdp.identity.approvers import add_approver
from pdp.store.migrate import upgrade
from pdp.v1 import pdp_pb2

APPROVER = "lead-1"
WAIT = 30.0  # seconds; only an upper bound for things that happen at once when the page works

XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database("sqlite", tmp_path_factory.mktemp("admin-browser")) as url:
        upgrade(url)
        with running_server(url) as server:
            yield server


@pytest.fixture(scope="module")
def token(admin: Server) -> str:
    """The approver's token; critical-priority tickets need ops-oncall, bulk closes support-leads."""
    return add_approver(admin.engine, APPROVER, ["support-leads", "ops-oncall"])


@pytest.fixture(scope="module")
def agent(admin: Server) -> PdpClient:
    """A support agent owned by ``tester``: not the approver, so separation of duties lets lead-1 vote."""
    return admin.agent_client(("support",))[1]


@pytest.fixture
def driver(browser: WebDriver, admin: Server) -> WebDriver:
    """The session's browser, logged out (cookies are per host, not per port) and laptop-sized."""
    browser.get(f"{admin.admin_url}/healthz")
    browser.delete_all_cookies()
    browser.set_window_size(1366, 768)
    return browser


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, WAIT)


def loaded(driver: WebDriver) -> None:
    """Until the document and everything in it (images, their error handlers) has loaded."""
    wait(driver).until(lambda d: d.execute_script("return document.readyState") == "complete")


def status(driver: WebDriver) -> int:
    """The HTTP status the current page was served with."""
    value = driver.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")
    return int(value)


def path(driver: WebDriver) -> str:
    return urlsplit(driver.current_url).path


def _detached(element: WebElement) -> Callable[[WebDriver], bool]:
    """Like ``staleness_of``, but mid-navigation chromedriver may also answer "node does not belong to the
    document" (a plain WebDriverException): that means the old page is gone too."""

    def check(_: WebDriver) -> bool:
        try:
            element.is_enabled()
        except WebDriverException:  # StaleElementReferenceException is one
            return True
        return False

    return check


def submit(driver: WebDriver, button: WebElement) -> None:
    """Click a form's button and wait for the page the browser navigates to."""
    button.click()
    wait(driver).until(_detached(button))
    loaded(driver)


def log_in(driver: WebDriver, admin: Server, token: str) -> None:
    driver.get(f"{admin.admin_url}/login")
    form = driver.find_element(By.ID, "login-form")
    field = form.find_element(By.ID, "token")
    assert field.get_attribute("name") == "token"
    assert field.get_attribute("type") == "password"
    field.send_keys(token)
    submit(driver, form.find_element(By.ID, "login"))


def state(driver: WebDriver) -> str:
    """The state shown on a detail page, as the enum's name: `Pending approval` → PENDING_APPROVAL."""
    return re.sub(r"[\s-]+", "_", driver.find_element(By.ID, "state").text.strip()).upper()


def open_detail(driver: WebDriver, admin: Server, proposal_id: str) -> None:
    driver.get(f"{admin.admin_url}/proposals/{quote(proposal_id)}")
    loaded(driver)
    assert status(driver) == 200, driver.page_source


def propose(agent: PdpClient, justification: str = "the customer reports an outage", **params: Any) -> str:
    """A proposal that needs one approval from ops-oncall: raising a ticket to critical priority."""
    response = agent.propose("tickets", "POST", TICKETS, justification, params={"priority": "critical", **params})
    assert response.decision.outcome == pdp_pb2.NEEDS_APPROVAL, response
    assert response.state == pdp_pb2.PENDING_APPROVAL
    return response.proposal_id


def no_alert(driver: WebDriver) -> bool:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    alert.dismiss()
    return False


def test_log_in_find_open_and_approve(driver: WebDriver, admin: Server, token: str, agent: PdpClient) -> None:
    proposal_id = propose(agent)

    log_in(driver, admin, token)
    assert path(driver) == "/"
    assert status(driver) == 200
    item = driver.find_element(By.CSS_SELECTOR, f'.proposal[data-proposal-id="{proposal_id}"]')
    countdown = item.find_element(By.CSS_SELECTOR, "span.countdown")
    assert countdown.get_attribute("data-expires-at")
    assert not driver.find_elements(By.ID, "empty")

    link = item.find_element(By.CSS_SELECTOR, f'a[href="/proposals/{proposal_id}"]')
    link.click()
    wait(driver).until(lambda d: path(d) == f"/proposals/{proposal_id}")
    loaded(driver)
    assert state(driver) == "PENDING_APPROVAL"
    assert not driver.find_elements(By.ID, "why-not")

    form = driver.find_element(By.ID, "approve-form")
    form.find_element(By.NAME, "comment").send_keys("confirmed with the customer on the phone")
    submit(driver, form.find_element(By.ID, "approve"))

    assert path(driver) == f"/proposals/{proposal_id}"  # 303 back to the detail page
    assert status(driver) == 200
    assert state(driver) == "APPROVED"
    # No executor runs here, so the agent sees it approved (and it stays there).
    assert agent.get(proposal_id).state == pdp_pb2.APPROVED

    driver.get(f"{admin.admin_url}/")
    loaded(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, f'.proposal[data-proposal-id="{proposal_id}"]')


def test_justification_is_shown_as_text_not_run(driver: WebDriver, admin: Server, token: str, agent: PdpClient) -> None:
    # The payload does run when a page includes it unescaped: the check below can tell.
    driver.get("data:text/html;charset=utf-8," + quote(f"<p>{XSS}</p>"))
    loaded(driver)
    assert driver.execute_script("return window.__xss") is not None

    proposal_id = propose(agent, XSS)
    log_in(driver, admin, token)
    loaded(driver)
    assert driver.find_element(By.CSS_SELECTOR, f'.proposal[data-proposal-id="{proposal_id}"]')
    assert driver.execute_script("return window.__xss") is None
    assert no_alert(driver)

    open_detail(driver, admin, proposal_id)
    justification = driver.find_element(By.ID, "justification")
    assert XSS in justification.text
    assert driver.execute_script("return document.querySelectorAll('#justification *').length") == 0
    assert "unverified" in driver.find_element(By.ID, "justification-label").text.lower()
    assert driver.execute_script("return window.__xss") is None
    assert no_alert(driver)


def test_form_posts_need_the_csrf_token(driver: WebDriver, admin: Server, token: str, agent: PdpClient) -> None:
    proposal_id = propose(agent)
    log_in(driver, admin, token)

    tampered = {
        "missing": "document.querySelector('#{form} input[name=csrf_token]').remove()",
        "forged": "document.querySelector('#{form} input[name=csrf_token]').value = 'forged'",
    }
    for form_id, field, button in (("approve-form", "comment", "approve"), ("reject-form", "reason", "reject")):
        for how, script in tampered.items():
            open_detail(driver, admin, proposal_id)
            form = driver.find_element(By.ID, form_id)
            assert form.find_element(By.NAME, "csrf_token").get_attribute("type") == "hidden"
            form.find_element(By.NAME, field).send_keys(f"csrf token {how}")
            driver.execute_script(script.format(form=form_id))
            submit(driver, form.find_element(By.ID, button))
            assert status(driver) == 403, (form_id, how, driver.page_source)
            assert agent.get(proposal_id).state == pdp_pb2.PENDING_APPROVAL, (form_id, how)

    # With its token intact, the same form goes through: the refusals above were about the token.
    open_detail(driver, admin, proposal_id)
    submit(driver, driver.find_element(By.ID, "approve"))
    assert status(driver) == 200
    assert state(driver) == "APPROVED"
    assert agent.get(proposal_id).state == pdp_pb2.APPROVED


def test_session_cookie_is_httponly_and_samesite_strict(driver: WebDriver, admin: Server, token: str) -> None:
    log_in(driver, admin, "pdp_not-the-token")
    assert status(driver) == 401
    assert driver.find_element(By.ID, "error").is_displayed()
    assert driver.get_cookie("pdp_session") is None

    log_in(driver, admin, token)
    assert path(driver) == "/"
    cookie = driver.get_cookie("pdp_session")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert "pdp_session" not in driver.execute_script("return document.cookie")


def test_no_horizontal_scroll_on_a_laptop(driver: WebDriver, admin: Server, token: str, agent: PdpClient) -> None:
    title = "Checkout fails for EU customers after the 2.3 deploy"
    typical = {
        "title": title,
        "customer": "ACME GmbH",
        "ticket": 48213,
        "tags": ["checkout", "eu", "regression"],
        "assignee": "payments-team",
        "link": "https://status.example.com/incidents/2026-11-21/checkout-eu-card-payments-failing-after-deploy-2-3"
        "?source=support-console&ticket=48213",
    }
    proposal_id = propose(
        agent,
        "Several customers report failed card payments since this morning's deploy; support lead asked for "
        "critical priority so on-call looks at it now.",
        **typical,
    )
    log_in(driver, admin, token)
    overflow = "return document.documentElement.scrollWidth <= window.innerWidth"
    assert driver.execute_script("return window.innerWidth") <= 1366
    assert driver.execute_script(overflow), "the list scrolls sideways"

    open_detail(driver, admin, proposal_id)
    source = driver.find_element(By.TAG_NAME, "body").text
    assert title in source  # the params are on the page (wherever it puts them)
    assert driver.execute_script(overflow), "the detail page scrolls sideways"
    # Nor does a box holding the agent's text (params, justification) hide part of it behind a scrollbar.
    clipped = driver.execute_script(
        "return Array.from(document.querySelectorAll('#justification, pre'))"
        ".filter(e => e.scrollWidth > e.clientWidth).map(e => e.id || e.tagName)"
    )
    assert clipped == []


def test_what_the_approver_may_not_decide(driver: WebDriver, admin: Server, token: str) -> None:
    """Separation of duties: lead-1's own agent's proposal is not in lead-1's list, and its page says why."""
    own = admin.add_agent(("support",), owner=APPROVER)
    proposal_id = propose(admin.client(own.token))
    log_in(driver, admin, token)
    assert not driver.find_elements(By.CSS_SELECTOR, f'.proposal[data-proposal-id="{proposal_id}"]')

    open_detail(driver, admin, proposal_id)
    assert state(driver) == "PENDING_APPROVAL"
    assert driver.find_element(By.ID, "why-not").text.strip()


def test_the_form_sends_back_the_digest_of_the_action_it_showed(
    driver: WebDriver, admin: Server, token: str, agent: PdpClient
) -> None:
    """A vote names the action the page showed; one naming any other action is refused (409), nothing recorded."""
    proposal_id = propose(agent)
    log_in(driver, admin, token)
    open_detail(driver, admin, proposal_id)
    field = driver.find_element(By.CSS_SELECTOR, "#approve-form input[name=action_digest]")
    assert field.get_attribute("type") == "hidden"
    assert field.get_attribute("value") == driver.find_element(By.ID, "action-digest").text.strip()
    driver.execute_script("document.querySelector('#approve-form input[name=action_digest]').value = '0'.repeat(64)")
    submit(driver, driver.find_element(By.ID, "approve"))
    assert status(driver) == 409, driver.page_source
    assert "action changed" in driver.find_element(By.ID, "error").text
    assert agent.get(proposal_id).state == pdp_pb2.PENDING_APPROVAL

    open_detail(driver, admin, proposal_id)
    submit(driver, driver.find_element(By.ID, "approve"))
    assert state(driver) == "APPROVED"
