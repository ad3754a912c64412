"""Real providers, on a real Dovecot set up like them: TLS with certificate verification,
STARTTLS, the IMAP ID command (RFC 2971), XOAUTH2 with a token from a command or a file
(checked by Dovecot's oauth2 passdb against the provider's introspection endpoint), and
several mailboxes and folders each with its own defaults."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import daemon_thread, eventually
from dovecots import LOG_ID, CustomDovecot, TokenIssuer, certificate, private_dovecot, tls_config
from servers import Mailbox, free_port
from support import desk_config, make_desk, make_mail, run_once

from mailflow.cli import main
from mailflow.fetch import ImapSettings, ImapSource, LoginRefused, SourceError, Token, TokenSource

DESK_USER = "desk@example.test"


def user(server: CustomDovecot, address: str = DESK_USER) -> Mailbox:
    box = Mailbox(server, address)
    server.add_user(box.address, box.password)
    return box


def tickets_json(config: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["--config", str(config), "tickets", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# -- TLS and STARTTLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[CustomDovecot, int, Path]]:
    """A Dovecot with a certificate: STARTTLS on its imap port, TLS on (server, imaps, cert)."""
    cert, key = certificate(tmp_path_factory.mktemp("cert"))
    imaps = free_port()
    with private_dovecot(extra=LOG_ID, replacements=tls_config(cert, key, imaps)) as server:
        yield server, imaps, cert


def tls_settings(box: Mailbox, **values: object) -> ImapSettings:
    return ImapSettings(**{"host": box.host, "username": box.address,  # type: ignore[arg-type]
                           "password": box.password, "timeout": 5.0, **values})


def test_tls_with_the_servers_ca_fetches_mail(tls_server):
    server, imaps, cert = tls_server
    box = user(server, "tls@example.test")
    box.append(make_mail("a@example.test", "TLS", "over TLS"))
    with ImapSource(tls_settings(box, port=imaps, security="tls", ca_file=str(cert))) as source:
        assert [f.uid for f in source.fetch(source.uids_after(0))] == [1]


def test_tls_verifies_the_certificate_by_default(tls_server):
    server, imaps, _ = tls_server
    box = user(server, "tls@example.test")
    with pytest.raises(SourceError, match="not trusted"):
        ImapSource(tls_settings(box, port=imaps, security="tls")).connect()


def test_starttls_upgrades_the_plain_port_before_login(tls_server):
    server, _, cert = tls_server
    box = user(server, "starttls@example.test")
    box.append(make_mail("a@example.test", "STARTTLS", "upgraded"))
    settings = tls_settings(box, port=server.port, security="starttls", ca_file=str(cert))
    with ImapSource(settings) as source:
        assert source.uids_after(0) == [1]
    logins = [line for line in server.log.read_text().splitlines()
              if "Login: user=<starttls@example.test>" in line]
    assert ", TLS," in logins[-1], logins  # ours; the test's own APPEND came in plain
    assert ", TLS," not in logins[0]


def test_starttls_also_verifies_the_certificate(tls_server):
    server, _, _ = tls_server
    box = user(server, "starttls@example.test")
    with pytest.raises(SourceError, match="not trusted"):
        ImapSource(tls_settings(box, port=server.port, security="starttls")).connect()


def test_starttls_refuses_a_server_that_does_not_offer_it(mailbox):
    """The shared test Dovecot has no TLS: never fall back to sending the password in clear."""
    settings = tls_settings(mailbox, port=mailbox.port, security="starttls")
    with pytest.raises(SourceError):
        ImapSource(settings).connect()


# -- IMAP ID (RFC 2971) ---------------------------------------------------------------------


def test_id_is_sent_before_select_when_configured(tls_server):
    server, _, cert = tls_server
    box = user(server, "coremail@example.test")
    fields = (("name", "mailflow"), ("version", "0.1.0"), ("vendor", "mailflow"))
    settings = tls_settings(box, port=server.port, security="starttls", ca_file=str(cert),
                            client_id=fields)
    with ImapSource(settings) as source:
        assert source.server_id.get("name") == "Dovecot"
    log = server.log.read_text()
    assert "imap(coremail@example.test)" in log
    assert "ID sent: name=mailflow, version=0.1.0, vendor=mailflow" in log


def test_send_id_in_config_reaches_the_server(tmp_path, tls_server, capsys):
    server, _, cert = tls_server
    box = user(server, "netease@example.test")
    box.append(make_mail("a@example.test", "网易邮箱", "要求先发 ID"))
    desk = make_desk(tmp_path, mailbox=box, imap={
        "security": "starttls", "ca_file": str(cert), "send_id": True})
    config = desk.settings.path
    assert run_once(desk).fetched == 1
    assert "imap(netease@example.test)" in server.log.read_text()
    assert "ID sent: name=mailflow, version=" in server.log.read_text()
    assert len(tickets_json(config, capsys)) == 1
    desk.close()


def test_no_id_is_sent_unless_configured(tls_server):
    server, _, cert = tls_server
    box = user(server, "plain-id@example.test")
    with ImapSource(tls_settings(box, port=server.port, security="starttls", ca_file=str(cert))):
        pass
    assert "imap(plain-id@example.test)" not in "\n".join(
        line for line in server.log.read_text().splitlines() if "ID sent" in line
    )


def test_id_fields_in_config_are_checked(tmp_path, mailbox, capsys):
    config = desk_config(tmp_path, mailbox=mailbox, imap={"id": {"name": "x" * 2000}})
    assert main(["--config", str(config), "check"]) == 1
    assert "imap.id" in capsys.readouterr().out


# -- XOAUTH2 ----------------------------------------------------------------------------------


@pytest.fixture
def oauth_server(tmp_path) -> Iterator[tuple[CustomDovecot, TokenIssuer]]:
    """A Dovecot checking XOAUTH2 tokens with the provider's introspection endpoint."""
    issuer = TokenIssuer()
    issuer.start()
    extra, replacements = issuer.dovecot_config(tmp_path)
    try:
        with private_dovecot(extra=extra, replacements=replacements) as server:
            yield server, issuer
    finally:
        issuer.stop()


def write_token(path: Path, token: str, expires_in: float | None = None) -> None:
    data: dict[str, object] = {"access_token": token, "token_type": "Bearer"}
    if expires_in is not None:
        data["expires_in"] = expires_in
    path.write_text(json.dumps(data))


def test_xoauth2_with_a_token_file_logs_in_and_tickets_mail(tmp_path, oauth_server, capsys):
    server, issuer = oauth_server
    box = user(server)
    issuer.valid["tok-1"] = box.address
    write_token(tmp_path / "token.json", "tok-1", 3600)
    box.append(make_mail("zhou.ba@example.test", "Outlook 无法同步", "一直转圈。"))
    imap = {"auth": "xoauth2", "oauth2_token_file": "token.json", "password": ""}
    desk = make_desk(tmp_path, mailbox=box, imap=imap)
    assert run_once(desk).fetched == 1
    assert issuer.asked == ["tok-1"]
    assert f"user=<{box.address}>, method=XOAUTH2" in server.log.read_text()
    assert len(tickets_json(desk.settings.path, capsys)) == 1
    desk.close()


def test_xoauth2_token_from_a_command(tmp_path, oauth_server):
    server, issuer = oauth_server
    box = user(server)
    issuer.valid["tok-cmd"] = box.address
    script = tmp_path / "token.py"
    script.write_text('import json; print(json.dumps({"access_token": "tok-cmd", '
                      '"expires_in": 3600}))\n')
    command = f"{sys.executable} {script}"
    desk = make_desk(tmp_path, mailbox=box, imap={"auth": "xoauth2",
                                                  "oauth2_token_command": command})
    assert run_once(desk).errors == []
    assert issuer.asked == ["tok-cmd"]
    desk.close()


def test_a_refused_token_is_fetched_again_once(tmp_path, oauth_server):
    """The command's first token is stale; the refusal makes it run again for a fresh one."""
    server, issuer = oauth_server
    box = user(server)
    issuer.valid["fresh"] = box.address
    counter = tmp_path / "runs"
    script = tmp_path / "token.py"
    script.write_text(
        "from pathlib import Path\n"
        f"p = Path({str(counter)!r}); n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1)); print('stale' if n == 0 else 'fresh')\n"
    )
    source = ImapSource(ImapSettings(
        box.host, box.port, security="none", username=box.address, auth="xoauth2",
        token=TokenSource(command=f"{sys.executable} {script}"), timeout=5))
    source.connect()
    source.close()
    assert issuer.asked == ["stale", "fresh"]


def test_a_token_the_server_refuses_is_a_login_error(tmp_path, oauth_server):
    server, issuer = oauth_server
    box = user(server)
    write_token(tmp_path / "token.json", "revoked", 3600)
    source = ImapSource(ImapSettings(
        box.host, box.port, security="none", username=box.address, auth="xoauth2",
        token=TokenSource(file=tmp_path / "token.json"), timeout=5))
    with pytest.raises(LoginRefused, match="oauth2_token_file"):
        source.connect()


def test_the_daemon_logs_in_again_with_a_fresh_token_before_expiry(tmp_path, oauth_server):
    """A token close to expiry is replaced (here by a cron job rewriting the file)."""
    server, issuer = oauth_server
    box = user(server)
    issuer.valid.update({"tok-old": box.address, "tok-new": box.address})
    token_file = tmp_path / "token.json"
    # Refresh when less than 3597 s of 3600 are left: three seconds after it was written.
    write_token(token_file, "tok-old", 3600)
    desk = make_desk(tmp_path, mailbox=box, smtp=None, desk={"poll_interval": 3600}, imap={
        "auth": "xoauth2", "oauth2_token_file": str(token_file),
        "oauth2_refresh_margin": 3597})
    with daemon_thread(desk) as daemon:
        watcher = eventually(lambda: daemon.watchers and daemon.watchers[0], what="watcher")
        eventually(lambda: watcher.idles >= 1, what="IDLE with the first token")
        write_token(token_file, "tok-new", 3600)
        eventually(lambda: "tok-new" in issuer.asked, what="a login with the new token")
        eventually(lambda: watcher.source.logins >= 2, what="the second session selected")
        assert watcher.backoff.failures == 0
        box.append(make_mail("wu.jiu@example.test", "Teams 登不上", "提示令牌过期。"))
        eventually(lambda: run_ticket_count(desk), what="mail after the token changed")
    desk.close()


def run_ticket_count(desk) -> int:
    from mailflow.models import Ticket

    with desk.db.sessions() as session:
        return session.query(Ticket).count()


# -- token sources, unit by unit --------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_bare_token_is_read_again_for_every_login(tmp_path):
    path = tmp_path / "token"
    path.write_text("abc\n")
    source = TokenSource(file=path)
    assert source.token() == Token("abc", None)
    path.write_text("def")
    assert source.token().value == "def"


def test_a_token_with_an_expiry_is_cached_until_the_margin(tmp_path):
    path = tmp_path / "token.json"
    clock = FakeClock(1_000_000.0)
    path.write_text(json.dumps({"access_token": "one", "expires_at": 1_003_600}))
    source = TokenSource(file=path, margin=300, clock=clock)
    assert source.token() == Token("one", 1_003_600.0)
    path.write_text(json.dumps({"access_token": "two", "expires_at": 1_007_200}))
    clock.now = 1_003_299.0
    assert source.token().value == "one", "still 301 s left: reused"
    clock.now = 1_003_300.0
    assert source.token().value == "two", "inside the margin: read again"


def test_expires_in_counts_from_when_the_file_was_written(tmp_path):
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"access_token": "t", "expires_in": 3600}))
    written = path.stat().st_mtime
    assert TokenSource(file=path, clock=FakeClock(written + 1000)).token().expires_at == (
        written + 3600
    )


def test_expires_at_may_be_iso_8601(tmp_path):
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"access_token": "t", "expires_at": "2026-11-24T03:00:00Z"}))
    assert TokenSource(file=path).token().expires_at == 1795489200.0


def test_invalidate_forgets_a_cached_token(tmp_path):
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"access_token": "a", "expires_in": 3600}))
    source = TokenSource(file=path)
    source.token()
    path.write_text(json.dumps({"access_token": "b", "expires_in": 3600}))
    assert source.token().value == "a"
    source.invalidate()
    assert source.token().value == "b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "gave no token"),
        ("two words", "gave no token"),
        ('{"token": "x"}', "access_token"),
        ('{"access_token": ""}', "empty access_token"),
        ('{"access_token": "x", "expires_in": "soon"}', "access_token/expiry"),
    ],
)
def test_unusable_token_output_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "token"
    path.write_text(text)
    with pytest.raises(SourceError, match=message):
        TokenSource(file=path).token()


def test_a_failing_token_command_names_the_key_and_its_message(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.exit('refresh token revoked')\n")
    source = TokenSource(command=f"{sys.executable} {script}")
    with pytest.raises(SourceError, match="oauth2_token_command exited 1: refresh token revoked"):
        source.token()


def test_a_missing_token_file_names_the_key(tmp_path):
    with pytest.raises(SourceError, match="oauth2_token_file"):
        TokenSource(file=tmp_path / "nope").token()


def test_xoauth2_config_needs_exactly_one_token_source(tmp_path, mailbox, capsys):
    config = desk_config(tmp_path, mailbox=mailbox, imap={"auth": "xoauth2"})
    assert main(["--config", str(config), "check"]) == 1
    assert "imap.auth" in capsys.readouterr().out


# -- several mailboxes and folders --------------------------------------------------------------


def mailboxes_config(tmp_path: Path, box: Mailbox) -> Path:
    config = desk_config(tmp_path, mailbox=box)
    config.write_text(config.read_text() + (
        '\n[[mailboxes]]\nfolder = "服务请求"\nkind = "request"\n'
        '\n[[mailboxes]]\nfolder = "Urgent"\npriority = "P1"\ncategory = "紧急"\n'
    ), encoding="utf-8")
    return config


def test_each_mailbox_folder_is_fetched_with_its_own_defaults(tmp_path, mailbox, capsys):
    from mailflow.config import load_config
    from mailflow.desk import Desk

    config = mailboxes_config(tmp_path, mailbox)
    unmatched = "麻烦处理一下"  # matches no rule: the default rule decides
    mailbox.append(make_mail("a@example.test", "一个问题", unmatched))
    mailbox.append(make_mail("b@example.test", "申请一下", unmatched), folder="服务请求")
    mailbox.append(make_mail("c@example.test", "快来人", unmatched), folder="Urgent")
    mailbox.append(make_mail("d@example.test", "打印机卡纸", "打印机卡纸了"), folder="Urgent")
    desk = Desk(load_config(config))
    assert [m.folder for m in desk.settings.mailboxes] == ["INBOX", "服务请求", "Urgent"]
    assert run_once(desk).fetched == 4
    by_sender = {t["requester"]: t for t in tickets_json(config, capsys)}
    assert by_sender["a@example.test"]["kind"] == "incident"
    assert by_sender["a@example.test"]["priority"] != "P1"
    assert by_sender["b@example.test"]["kind"] == "request"
    assert (by_sender["c@example.test"]["priority"], by_sender["c@example.test"]["category"]) == (
        "P1", "紧急")
    # A rule that matches wins over the mailbox's defaults.
    assert by_sender["d@example.test"]["category"] != "紧急"
    desk.close()


def test_mailboxes_inherit_imap_and_are_checked(tmp_path, mailbox, capsys):
    config = desk_config(tmp_path, mailbox=mailbox)
    config.write_text(config.read_text() + (
        '\n[[mailboxes]]\nfolder = "INBOX"\n'  # the same folder as [imap]
        '\n[[mailboxes]]\nfolder = "X"\npriority = "P9"\n'
    ))
    assert main(["--config", str(config), "check"]) == 1
    out = capsys.readouterr().out
    assert "mailboxes: two mailboxes read the same folder" in out
    assert "mailboxes.1.priority" in out


def test_a_mailbox_without_a_host_anywhere_is_a_problem(tmp_path, capsys):
    config = desk_config(tmp_path)
    config.write_text(config.read_text() + '\n[[mailboxes]]\nusername = "x@example.test"\n')
    assert main(["--config", str(config), "check"]) == 1
    assert "mailboxes.0.host" in capsys.readouterr().out


def test_several_mailboxes_are_watched_at_once(tmp_path, mailbox, smtp):
    from mailflow.config import load_config
    from mailflow.desk import Desk
    from mailflow.models import Ticket

    config = mailboxes_config(tmp_path, mailbox)
    config.write_text(config.read_text().replace("poll_interval = 0.2", "poll_interval = 3600"))
    mailbox.append(make_mail("x@example.test", "占位", "创建文件夹"), folder="Urgent")
    mailbox.append(make_mail("y@example.test", "占位", "创建文件夹"), folder="服务请求")
    desk = Desk(load_config(config))
    with daemon_thread(desk) as daemon:
        eventually(lambda: len(daemon.watchers) == 3 and all(w.idles for w in daemon.watchers),
                   what="three watchers in IDLE")
        mailbox.append(make_mail("e@example.test", "快来人", "麻烦处理一下"), folder="Urgent")

        def urgent() -> bool:  # no poll interval elapses here: IDLE brings it in
            with desk.db.sessions() as session:
                return session.query(Ticket).filter_by(priority="P1").count() == 2

        eventually(urgent, what="the urgent folder's mail ticketed")
    desk.close()
