"""Approval decisions that cannot be forged: each forgery arrives over the real IMAP server,
changes nothing, is recorded as an event, and the approver — never the forger — is told."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import make_msgid
from types import SimpleNamespace

import pytest
from support import body_of, desk_config, make_desk, make_mail, parsed, reply, run_once

from mailflow import approvals, lifecycle, senders
from mailflow.cli import main
from mailflow.config import check_config
from mailflow.models import Approval, KeyValue

REQUESTER = "zhang.san@example.test"
APPROVER = "approver@example.test"
EXECUTOR = "exec@example.test"
MALLORY = "mallory@example.test"
TRUSTED = "mx.example.test"


def cli_json(desk, capsys, *args: str):
    capsys.readouterr()
    assert main(["--config", str(desk.settings.path), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sent_to(smtp, address: str) -> list[bytes]:
    return [m.content for m in smtp.messages if address in m.rcpt_tos]


def answer(original: bytes, sender: str, body: str, **kwargs) -> bytes:
    """A reply as a mail client writes it: to the mail's Reply-To, quoting it below."""
    msg = parsed(original)
    return reply(original, sender, body, to=str(msg.get("Reply-To") or msg["From"]), **kwargs)


def request(mailbox, desk, smtp, clock, subject: str = "申请开通VPN") -> bytes:
    """A complete request; returns the approval mail the approver received for it."""
    before = len(sent_to(smtp, APPROVER))
    mailbox.append(make_mail(REQUESTER, subject, "申请原因：出差期间访问内网"))
    run_once(desk, clock)
    mails = sent_to(smtp, APPROVER)
    assert len(mails) == before + 1
    return mails[-1]


def token_of(approval_mail: bytes) -> str:
    return str(parsed(approval_mail)["Reply-To"]).split("+", 1)[1].split("@")[0]


def refusals(desk, capsys, ref: str = "REQ-1") -> list[dict]:
    ticket = cli_json(desk, capsys, "show", ref)
    return [e for e in ticket["events"] if e["action"] == "approval_refused"]


def told(smtp, address: str) -> list[bytes]:
    """The approval-refused notices an address received."""
    return [m for m in sent_to(smtp, address) if "审批未生效" in parsed(m)["Subject"]]


def assert_unchanged(desk, capsys, smtp, ref: str = "REQ-1") -> None:
    ticket = cli_json(desk, capsys, "show", ref)
    assert ticket["status"] == "pending_approval"
    assert not [e for e in ticket["events"] if e["action"] in ("approved", "rejected")]
    assert sent_to(smtp, EXECUTOR) == []
    with desk.db.sessions() as session:
        assert all(r.decision is None for r in session.query(Approval).all()), "no token spent"


def with_headers(raw: bytes, *lines: str) -> bytes:
    """Headers put on top, as the receiving MTA does (the first line ends up topmost)."""
    return "".join(f"{line}\r\n" for line in lines).encode() + raw


# -- forgeries over the real servers --------------------------------------------------------


def test_someone_else_replying_with_the_real_token_is_refused(desk, mailbox, smtp, clock, capsys):
    approval = request(mailbox, desk, smtp, clock)
    # Mallory got hold of the approval mail (e.g. it was forwarded) and answers it.
    clock.advance(minutes=10)
    mailbox.append(answer(approval, MALLORY, "同意"))
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp)
    [event] = refusals(desk, capsys)
    assert event["actor"] == MALLORY and APPROVER not in event["actor"]
    assert "不是该审批凭证的审批人" in event["detail"]
    [notice] = told(smtp, APPROVER)
    assert MALLORY in body_of(notice)
    assert sent_to(smtp, MALLORY) == [], "the forger is never answered"

    # The real approver can still decide with the same token.
    mailbox.append(answer(approval, APPROVER, "同意"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"


def test_a_flood_of_forgeries_does_not_flood_the_approver(desk, mailbox, smtp, clock, capsys):
    approval = request(mailbox, desk, smtp, clock)
    flood = desk.settings.limits.auto_replies_per_sender_per_hour + 3  # past the cap
    for n in range(flood):
        mailbox.append(answer(approval, f"mallory{n}@example.test", "同意"))
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp)
    assert len(refusals(desk, capsys)) == flood, "every one is recorded"
    assert len(told(smtp, APPROVER)) == desk.settings.limits.auto_replies_per_sender_per_hour
    clock.advance(hours=2)
    mailbox.append(answer(approval, MALLORY, "同意"))
    run_once(desk, clock)
    assert len(told(smtp, APPROVER)) == desk.settings.limits.auto_replies_per_sender_per_hour + 1


def test_a_mail_from_the_approvers_address_without_the_token_is_refused(desk, mailbox, smtp,
                                                                       clock, capsys):
    request(mailbox, desk, smtp, clock)
    ack = sent_to(smtp, REQUESTER)[0]
    # A fresh mail naming the ticket, and a reply to a mail that carries no token.
    mailbox.append(make_mail(APPROVER, "[REQ-1] 同意", "同意"))
    mailbox.append(reply(ack, APPROVER, "approve"))
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp)
    events = refusals(desk, capsys)
    assert len(events) == 2 and all("没有审批凭证" in e["detail"] for e in events)
    assert len(told(smtp, APPROVER)) == 2


def test_a_replayed_token_is_refused(desk, mailbox, smtp, clock, capsys):
    approval = request(mailbox, desk, smtp, clock)
    decision = answer(approval, APPROVER, "同意")
    mailbox.append(decision)
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"
    executor_mails = len(sent_to(smtp, EXECUTOR))

    # The same mail again (a new Message-ID, so it is not dropped as a duplicate), turned
    # into a rejection: the token is spent.
    clock.advance(minutes=10)
    replay = decision.replace(b"\n\n\xe5\x90\x8c\xe6\x84\x8f", b"\n\n\xe9\xa9\xb3\xe5\x9b\x9e x", 1)
    old_id = parsed(decision)["Message-ID"].encode()
    replay = replay.replace(old_id, make_msgid("replay", "example.test").encode())
    assert parsed(replay)["Message-ID"] != parsed(decision)["Message-ID"]
    mailbox.append(replay)
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "REQ-1")
    assert ticket["status"] == "approved"
    assert [e["action"] for e in ticket["events"]].count("approved") == 1
    [event] = refusals(desk, capsys)
    assert "已使用" in event["detail"]
    assert len(told(smtp, APPROVER)) == 1
    assert len(sent_to(smtp, EXECUTOR)) == executor_mails


def test_a_token_from_another_request_is_refused(desk, mailbox, smtp, clock, capsys):
    first = request(mailbox, desk, smtp, clock, "申请开通VPN")
    request(mailbox, desk, smtp, clock, "申请安装Visio软件")
    # The approver's token for REQ-1, sent as a decision on REQ-2.
    forged = answer(first, APPROVER, "同意", subject="Re: [REQ-2] 【待审批】申请安装Visio软件")
    mailbox.append(forged)
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp, "REQ-2")
    assert_unchanged(desk, capsys, smtp, "REQ-1")
    [event] = refusals(desk, capsys, "REQ-2")
    assert "REQ-1" in event["detail"]
    assert len(told(smtp, APPROVER)) == 1


def test_an_expired_token_is_refused_and_a_new_one_sent(desk, mailbox, smtp, clock, capsys):
    approval = request(mailbox, desk, smtp, clock)
    clock.advance(days=15)  # token_ttl is 14 days
    mailbox.append(answer(approval, APPROVER, "同意"))
    run_once(desk, clock)
    assert_unchanged_but_replaced = cli_json(desk, capsys, "show", "REQ-1")
    assert assert_unchanged_but_replaced["status"] == "pending_approval"
    [event] = refusals(desk, capsys)
    assert "过期" in event["detail"]
    [notice] = told(smtp, APPROVER)
    assert "重新发送" in body_of(notice)
    fresh = [m for m in sent_to(smtp, APPROVER) if "待审批" in parsed(m)["Subject"]]
    assert len(fresh) == 2 and token_of(fresh[1]) != token_of(approval)

    # The old token stays dead; the new one works.
    mailbox.append(answer(approval, APPROVER, "同意"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "pending_approval"
    mailbox.append(answer(fresh[1], APPROVER, "同意"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"


def test_tampered_conflicting_and_multi_sender_mails_are_refused(desk, mailbox, smtp, clock,
                                                                 capsys):
    approval = request(mailbox, desk, smtp, clock)
    token = token_of(approval)
    tampered = token[:-1] + ("a" if token[-1] != "a" else "b")
    mailbox.append(make_mail(APPROVER, "[REQ-1] ok", "同意",
                             to=f"itsm+{tampered}@example.test"))
    other = approvals.make_token(b"x", 1, 0, APPROVER)
    mailbox.append(make_mail(APPROVER, "[REQ-1] ok", "同意", to=f"itsm+{other}@example.test",
                             in_reply_to=parsed(approval)["Message-ID"]))
    mailbox.append(answer(approval, APPROVER, "同意").replace(
        f"From: {APPROVER}".encode(), f"From: {APPROVER}, {MALLORY}".encode(), 1))
    mailbox.append(with_headers(answer(approval, APPROVER, "同意"), f"Sender: {MALLORY}"))
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp)
    details = [e["detail"] for e in refusals(desk, capsys)]
    assert len(details) == 4
    assert "无效" in details[0] and "多个" in details[1] and "发件人不唯一" in details[2]
    assert "代发" in details[3] and MALLORY in details[3]
    assert sent_to(smtp, MALLORY) == []


def test_the_reply_address_alone_finds_the_request(desk, mailbox, smtp, clock, capsys):
    """A client that lost the subject tag and the thread still reaches the request."""
    approval = request(mailbox, desk, smtp, clock)
    mailbox.append(make_mail(APPROVER, "我的意见", "同意",
                             to=str(parsed(approval)["Reply-To"])))
    run_once(desk, clock)
    assert [t["ref"] for t in cli_json(desk, capsys, "tickets")] == ["REQ-1"]
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"


# -- the real approver, writing as people write ----------------------------------------------


def test_an_approver_whose_encoded_name_holds_a_comma_decides(desk, mailbox, smtp, clock,
                                                              capsys):
    approval = request(mailbox, desk, smtp, clock)
    raw = answer(approval, APPROVER, "同意")
    # How mail clients write the display name "Li, Si (李四)": the comma is inside a word.
    raw = raw.replace(b"From: approver@example.test",
                      b"From: =?utf-8?b?TGksIFNpICjmnY7lm5sp?= <approver@example.test>", 1)
    assert b"=?utf-8?b?TGksIFNpICjmnY7lm5sp?=" in raw
    mailbox.append(raw)
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"
    assert refusals(desk, capsys) == []


def test_a_greeting_before_the_decision_and_a_signature_after_it(desk, mailbox, smtp, clock,
                                                                capsys):
    approval = request(mailbox, desk, smtp, clock)
    mailbox.append(answer(approval, APPROVER, "您好：\n同意。\n\n李四\n财务处 | 电话 1234"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-1")["status"] == "approved"
    # A rejection needs a reason, and a signature is none.
    approval = request(mailbox, desk, smtp, clock, "申请开通邮箱")
    mailbox.append(answer(approval, APPROVER, "驳回\n\n李四\n财务处 | 电话 1234"))
    run_once(desk, clock)
    assert cli_json(desk, capsys, "show", "REQ-2")["status"] == "pending_approval"
    assert [e["detail"] for e in refusals(desk, capsys, "REQ-2")] == [
        f"reject: {approvals.reason('reason_required')}"
    ]
    mailbox.append(
        answer(approval, APPROVER, "Hi,\nreject: no budget this year\n\nBest regards,\nLi Si")
    )
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "REQ-2")
    assert ticket["status"] == "rejected"
    assert [e["detail"] for e in ticket["events"] if e["action"] == "rejected"] == [
        "step 1/1 approvers.default: no budget this year"
    ]


def test_a_token_whose_stored_row_was_altered_is_refused(desk, mailbox, smtp, clock, capsys):
    """The HMAC binds the token to its approver: rewriting the row does not reroute it."""
    approval = request(mailbox, desk, smtp, clock)
    with desk.db.transaction() as session:
        row = session.query(Approval).one()
        row.approver = MALLORY
    mailbox.append(answer(approval, MALLORY, "同意"))
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "REQ-1")
    assert ticket["status"] == "pending_approval"
    [event] = refusals(desk, capsys)
    assert "无效" in event["detail"]


@pytest.fixture
def dkim_desk(tmp_path, mailbox, smtp):
    made = make_desk(tmp_path, mailbox=mailbox, smtp=smtp,
                     requests={"require_dkim": True, "trusted_authserv_id": TRUSTED})
    yield made
    made.close()


def test_forged_authentication_results_are_ignored(dkim_desk, mailbox, smtp, clock, capsys):
    desk = dkim_desk
    approval = request(mailbox, desk, smtp, clock)
    decision = answer(approval, APPROVER, "同意")
    # The sender wrote a passing header under our MTA's name; our MTA's own (topmost) says fail.
    forged = with_headers(
        decision,
        f"Authentication-Results: {TRUSTED}; dkim=fail header.d=example.test; "
        "dmarc=fail header.from=example.test",
        f"Authentication-Results: {TRUSTED}; dkim=pass header.d=example.test; "
        "dmarc=pass header.from=example.test",
    )
    mailbox.append(forged)
    # A pass from some other server, and none from ours at all.
    mailbox.append(with_headers(
        answer(approval, APPROVER, "同意"),
        "Authentication-Results: mx.evil.test; dkim=pass header.d=example.test",
    ))
    # Our MTA passed DKIM, but for the attacker's own domain.
    mailbox.append(with_headers(
        answer(approval, APPROVER, "同意"),
        f"Authentication-Results: {TRUSTED}; dkim=pass header.d=evil.test; "
        "dmarc=pass header.from=evil.test",
    ))
    run_once(desk, clock)
    assert_unchanged(desk, capsys, smtp)
    details = [e["detail"] for e in refusals(desk, capsys)]
    assert len(details) == 3 and all("DKIM" in d for d in details)
    assert len(told(smtp, APPROVER)) == 3

    # The genuine reply, vouched for by our MTA's topmost header, is accepted.
    mailbox.append(with_headers(
        answer(approval, APPROVER, "同意"),
        f"Authentication-Results: {TRUSTED} 1; spf=pass smtp.mailfrom=example.test; "
        "dkim=pass (2048-bit key) header.d=example.test header.s=s1; "
        "dmarc=pass (p=reject) header.from=example.test",
    ))
    run_once(desk, clock)
    ticket = cli_json(desk, capsys, "show", "REQ-1")
    assert ticket["status"] == "approved"


# -- units: tokens, secret, Authentication-Results, config ---------------------------------


def test_a_token_is_bound_to_its_request_step_and_approver():
    key = b"k" * 32
    token = approvals.make_token(key, 7, 1, APPROVER)
    assert len(token) == approvals.TOKEN_LENGTH and token.isalnum() and token == token.lower()

    def row(ticket_id: int, step: int, approver: str) -> SimpleNamespace:
        return SimpleNamespace(ticket_id=ticket_id, step=step, approver=approver)

    assert approvals.token_valid_for(key, token, row(7, 1, APPROVER))
    assert not approvals.token_valid_for(key, token, row(8, 1, APPROVER))
    assert not approvals.token_valid_for(key, token, row(7, 0, APPROVER))
    assert not approvals.token_valid_for(key, token, row(7, 1, MALLORY))
    assert not approvals.token_valid_for(b"other", token, row(7, 1, APPROVER))
    assert approvals.make_token(key, 7, 1, APPROVER) != token, "a fresh nonce every time"


def test_without_a_configured_secret_one_is_generated_once_and_kept(tmp_path):
    path = desk_config(tmp_path, desk={"secret": ""})
    from mailflow.config import load_config
    from mailflow.desk import Desk

    desk = Desk(load_config(path))
    try:
        with desk.db.transaction() as session:
            first = senders.secret(session, desk)
            assert senders.secret(session, desk) == first
        assert len(first) == 64
    finally:
        desk.close()
    desk = Desk(load_config(path))
    try:
        with desk.db.transaction() as session:
            assert senders.secret(session, desk) == first
            assert session.get(KeyValue, senders.SECRET_KEY).value.encode() == first
    finally:
        desk.close()


def test_tokens_are_read_from_the_reply_address_and_the_thread():
    token = approvals.make_token(b"k", 1, 0, APPROVER)
    mail = SimpleNamespace(
        to=[f"itsm+{token}@example.test"], cc=[], in_reply_to=[], references=[],
        addresses=lambda name: [],
    )
    assert approvals.tokens_in(mail, "itsm@example.test") == [token]
    mail.to = ["itsm@example.test"]
    mail.references = ["x@y", approvals.message_id("itsm@example.test", token)]
    assert approvals.tokens_in(mail, "itsm@example.test") == [token]
    mail.references = []
    mail.addresses = lambda name: [f"ITSM+{token.upper()}@EXAMPLE.TEST"] if name == (
        "delivered-to") else []
    assert approvals.tokens_in(mail, "itsm@example.test") == [token]
    mail.addresses = lambda name: []
    mail.to = [f"other+{token}@example.test", f"itsm+{token}@evil.test"]
    assert approvals.tokens_in(mail, "itsm@example.test") == []


def test_authentication_results_parsing():
    authserv, results = senders.parse_authentication_results(
        'mx.example.test 1; (a comment (nested)) dkim/1=pass reason="good sig" '
        "header.d=Example.TEST header.s=sel; dmarc=pass header.from=example.test; spf=none"
    )
    assert authserv == "mx.example.test"
    assert [(r.method, r.result) for r in results] == [
        ("dkim", "pass"), ("dmarc", "pass"), ("spf", "none")
    ]
    assert results[0].props["header.d"] == "example.test"
    assert senders.parse_authentication_results("mx.example.test; none") == (
        "mx.example.test", []
    )

    ok, _ = senders.authenticated(
        ["mx.example.test; dkim=pass header.d=example.test"], TRUSTED, "a@sub.example.test"
    )
    assert ok, "a parent-domain signature is aligned"
    ok, _ = senders.authenticated(
        ["mx.example.test; dkim=pass header.i=@example.test"], TRUSTED, APPROVER
    )
    assert ok
    ok, _ = senders.authenticated(
        ["mx.example.test; dkim=pass header.d=test"], TRUSTED, APPROVER
    )
    assert not ok, "a bare top-level domain never aligns"
    ok, _ = senders.authenticated(
        ["mx.example.test; dmarc=pass header.from=sub.example.test"], TRUSTED, APPROVER
    )
    assert not ok, "DMARC must name the approver's own domain"
    ok, why = senders.authenticated(
        ["MX.EXAMPLE.TEST; dkim=temperror header.d=example.test",
         "mx.example.test; dkim=pass header.d=example.test"], TRUSTED, APPROVER
    )
    assert not ok and "temperror" in why, "only the topmost trusted header counts"
    ok, _ = senders.authenticated(["mx.example.test; dkim=pass header.d=example.test"], "",
                                    APPROVER)
    assert not ok, "without a trusted authserv-id nothing is trusted"


def test_config_problems_are_named_by_key(tmp_path):
    path = desk_config(
        tmp_path,
        requests={
            "require_dkim": True,
            "required_fields": {"hardware": ["reason", "colour"]},
            "approval_chain": {"hardware": ["dept_head", "l3"], "software": []},
        },
    )
    problems = {p.key: p.message for p in check_config(path)}
    assert "colour" in problems["requests.required_fields.hardware"]
    assert "dept_head" in problems["requests.approval_chain.hardware"]
    assert "requests.approval_chain.software" in problems
    assert "requests.trusted_authserv_id" in problems
    good = desk_config(
        tmp_path,
        roles={"approvers": {"default": [APPROVER], "dept_head": ["head@example.test"]}},
        requests={"approval_chain": {"hardware": ["dept_head", "l3", "cio@example.test"]},
                  "required_fields": {"default": ["reason"]}},
    )
    assert check_config(good) == []


def test_the_chain_names_groups_roles_and_addresses(tmp_path):
    from mailflow.config import load_config

    settings = load_config(desk_config(
        tmp_path,
        roles={"approvers": {"default": [APPROVER], "dept_head": ["head@example.test"]}},
        requests={"approval_chain": {"hardware": ["dept_head", "l3", "cio@example.test"]}},
    ))
    steps = lifecycle.chain(settings, "hardware")
    assert [s.approvers for s in steps] == [
        ("head@example.test",), ("l3@example.test",), ("cio@example.test",)
    ]
    [single] = lifecycle.chain(settings, "software")
    assert single.approvers == (APPROVER,)


def test_expiry_is_checked_against_the_passed_in_clock(tmp_path):
    desk = make_desk(tmp_path)
    now = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
    try:
        with desk.db.transaction() as session:
            from mailflow.models import Ticket

            ticket = Ticket(kind="request", number=1, status="pending_approval", priority="P4",
                            category="x", rule="r", requester=REQUESTER, subject="s",
                            created_at=now, updated_at=now)
            session.add(ticket)
            session.flush()
            issued = approvals.issue(session, desk, ticket, 0, "g", APPROVER, now)
            assert issued.approval.expires_at == now + timedelta(days=14)
            assert issued.approval.token_hash != issued.token
            assert issued.token not in issued.approval.token_hash
    finally:
        desk.close()


def test_two_deciders_racing_for_one_token_only_one_wins(desk, mailbox, smtp, clock):
    """The token is spent by a conditional update: a second claim, even by a daemon that
    read the row before the first committed, changes nothing."""
    from mailflow import requests
    from mailflow.commands import Command

    request(mailbox, desk, smtp, clock)
    approve, reject = Command("approve", "", "同意"), Command("reject", "no", "驳回 no")
    with desk.db.sessions() as late:
        stale = late.query(Approval).one()  # read before the other decision commits
        assert stale.decision is None
        with desk.db.transaction() as first:
            assert requests._claim(first, first.get(Approval, stale.id), approve, clock())
        assert not requests._claim(late, stale, reject, clock())
        late.commit()
    with desk.db.sessions() as session:
        row = session.query(Approval).one()
        assert (row.decision, row.reason) == ("approve", None)
