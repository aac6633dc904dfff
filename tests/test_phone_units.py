"""lmlink.net.phone: which URL a phone is told, and the one-shot profile listener (loopback)."""

from __future__ import annotations

import threading

import httpx

from lmlink.net.mobileconfig import ca_from_profile
from lmlink.net.phone import ProfileServer, advise
from lmlink.net.tls import ProjectCA


def test_tailnet_certificate_means_its_magicdns_name_and_no_profile(tmp_path):
    ca = ProjectCA.load_or_create(tmp_path)
    leaf = ca.issue_server(["studio.tail1234.ts.net"])  # stands in for the LocalAPI cert
    advice = advise("tailnet", leaf.cert_pem, ["100.64.0.7"], 47471)
    assert advice.url == "https://studio.tail1234.ts.net:47471/v1/shortcuts/ask"
    assert advice.needs_profile is False


def test_project_ca_means_a_profile_and_the_name_on_the_leaf(tmp_path):
    ca = ProjectCA.load_or_create(tmp_path)
    leaf = ca.issue_server(["studio.tn.example", "100.64.0.7"])
    advice = advise("project-ca", leaf.cert_pem, ["100.64.0.7"], 47471)
    assert advice.url == "https://studio.tn.example:47471/v1/shortcuts/ask"
    assert advice.needs_profile is True


def test_profile_server_serves_one_download_then_stops(tmp_path):
    ca = ProjectCA.load_or_create(tmp_path)
    server = ProfileServer("127.0.0.1", 0, ca.cert_pem, "studio", lifetime=20)
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(server.serve()))
    thread.start()
    base = server.url.rsplit("/", 1)[0]
    assert httpx.get(f"{base}/other", timeout=5).status_code == 404
    got = httpx.get(server.url, timeout=5)
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/x-apple-aspen-config"
    assert ca_from_profile(got.content).strip() == ca.cert_pem.strip()
    thread.join(5)
    assert done == [1]
