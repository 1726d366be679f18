"""The web admin in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
log in, add a user, see it listed; that user logs in and changes their own password.
Screenshots are saved under the test's tmp dir and their paths printed."""

from __future__ import annotations

import shutil
import smtplib

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from support import addUser, freePort, startServer

ADMIN = "postmaster@example.test"


@pytest.fixture
def chromium(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-extensions", "--disable-component-update", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    driver.implicitly_wait(15)  # find_element waits for the page a click leads to
    yield driver
    driver.quit()


def test_admin_adds_a_user_who_then_changes_their_password(dataDir, chromium, tmp_path):
    addUser(dataDir, ADMIN, "adminpw")
    port = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [ADMIN]})
    try:
        with smtplib.SMTP("127.0.0.1", srv.smtpPort, timeout=30) as smtp:
            smtp.sendmail("someone@remote.test", [ADMIN], b"Subject: counted\r\n\r\nchart\r\n")
        chromium.get(f"http://127.0.0.1:{port}/admin/")
        assert chromium.current_url.endswith("/admin/login")  # no session: the login page
        chromium.find_element(By.ID, "address").send_keys(ADMIN)
        chromium.find_element(By.ID, "password").send_keys("adminpw")
        chromium.find_element(By.ID, "login").click()
        assert chromium.find_element(By.ID, "who").text == ADMIN
        # The traffic chart, from the same counters as /metrics: the message sent above.
        accepted = chromium.find_element(By.ID, "chart-accepted")
        assert accepted.get_attribute("data-total") == "1"
        assert chromium.find_element(By.CSS_SELECTOR, "#traffic svg").is_displayed()
        assert "accepted by SMTP: 1" in chromium.find_element(By.ID, "traffic").text
        chromium.find_element(By.ID, "new-user").send_keys("bob@example.test")
        chromium.find_element(By.ID, "new-password").send_keys("bobpw")
        chromium.find_element(By.ID, "add-user").click()
        assert chromium.find_element(By.ID, "done").text == "user bob@example.test added"
        listed = [cell.text for cell in chromium.find_elements(By.CSS_SELECTOR, "#users td")]
        assert "bob@example.test" in listed
        # DKIM keys, made by the CLI's code: listed with the records to publish.
        chromium.find_element(By.ID, "dkim-domain").send_keys("example.test")
        chromium.find_element(By.ID, "dkim-generate").click()
        WebDriverWait(chromium, 30).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "done"), "key set tm"))
        cells = [cell.text for cell in chromium.find_elements(By.CSS_SELECTOR, "#dkim td")]
        assert "example.test" in cells and "signing" in cells
        assert "._domainkey.example.test" in chromium.find_element(By.ID, "dkim").text
        screenshot = tmp_path / "webadmin-user-added.png"
        assert chromium.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")
        # Bob logs in and changes his own password; he sees no admin pages.
        chromium.find_element(By.CSS_SELECTOR, "header form button").click()
        chromium.find_element(By.ID, "address").send_keys("bob@example.test")
        chromium.find_element(By.ID, "password").send_keys("bobpw")
        chromium.find_element(By.ID, "login").click()
        # A click returns before the POST's answer has loaded: wait for the page it leads to.
        WebDriverWait(chromium, 30).until(expected_conditions.url_contains("/admin/password"))
        chromium.find_element(By.ID, "own-password").send_keys("bobs new password")
        chromium.find_element(By.ID, "change").click()
        WebDriverWait(chromium, 30).until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "done"), "password of bob@example.test changed"))
        own = tmp_path / "webadmin-own-password.png"
        assert chromium.save_screenshot(str(own))
        print(f"screenshot: {own}")
    finally:
        srv.stop()
