"""The people directory: CSV import through the CLI (UTF-8, BOM, GB18030, bad rows), the
LDAP sync against a real slapd, the requester's details in the owning tier's notice and in
`show --json` over the real IMAP and SMTP servers, rules by department, the VIP raise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
from support import REPO, body_of, desk_config, make_desk, make_mail, run_once

from mailflow import jobs, people
from mailflow.cli import main
from mailflow.config import load_config
from mailflow.desk import Desk
from mailflow.models import Event, Person
from mailflow.tickets import remember_person

HEADER = "email,name,department,phone,location,language,vip\n"
ZHANG = "zhang.san@example.test,张三,城东供电所,0871-6501234,城东供电所3楼301,zh-CN,否\n"
LI = "Li.Si@Example.test,李四,营销部,13800000000,本部大楼5楼,en,是\n"


def run_cli(capsys, config, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def listed(capsys, config) -> dict[str, dict]:
    code, out, _ = run_cli(capsys, config, "people", "--json")
    assert code == 0
    return {row["email"]: row for row in json.loads(out)}


@pytest.fixture
def config(tmp_path):
    return desk_config(tmp_path)


# -- CSV import ----------------------------------------------------------------------------


def test_import_adds_then_updates_by_email_and_lists(tmp_path, config, capsys):
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(HEADER + ZHANG + LI, encoding="utf-8")
    assert run_cli(capsys, config, "people", "import", str(csv_file))[:2] == (
        0, "added 2, updated 0, skipped 0\n")
    rows = listed(capsys, config)
    assert rows["zhang.san@example.test"] | {"synced_at": None} == {
        "email": "zhang.san@example.test", "name": "张三", "department": "城东供电所",
        "phone": "0871-6501234", "location": "城东供电所3楼301", "language": "zh-CN",
        "vip": False, "source": "csv", "synced_at": None,
        "last_seen": rows["zhang.san@example.test"]["last_seen"],
    }
    assert rows["li.si@example.test"]["vip"] is True  # the address is matched in lower case

    # Zhang moved office; the file without the optional columns keeps language and VIP.
    csv_file.write_text("email,name,department,phone,location\n"
                        "ZHANG.SAN@example.test,张三,城东供电所,0871-6509999,城东供电所2楼\n"
                        "wang.wu@example.test,王五,计量中心,,\n", encoding="utf-8")
    code, out, _ = run_cli(capsys, config, "people", "import", str(csv_file))
    assert (code, out) == (0, "added 1, updated 1, skipped 0\n")
    rows = listed(capsys, config)
    zhang = rows["zhang.san@example.test"]
    assert (zhang["phone"], zhang["location"], zhang["language"]) == (
        "0871-6509999", "城东供电所2楼", "zh-CN")
    assert rows["wang.wu@example.test"]["phone"] is None
    code, out, _ = run_cli(capsys, config, "people")
    assert code == 0 and "王五" in out and "li.si@example.test" in out


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030"])
def test_import_reads_excel_files_with_a_bom_and_in_gb18030(tmp_path, config, capsys, encoding):
    csv_file = tmp_path / "通讯录.csv"
    csv_file.write_bytes((HEADER + ZHANG + LI).replace("\n", "\r\n").encode(encoding))
    assert run_cli(capsys, config, "people", "import", str(csv_file))[:2] == (
        0, "added 2, updated 0, skipped 0\n")
    zhang = listed(capsys, config)["zhang.san@example.test"]
    assert (zhang["name"], zhang["department"], zhang["location"]) == (
        "张三", "城东供电所", "城东供电所3楼301")


def test_bad_rows_are_named_by_line_and_skipped(tmp_path, config, capsys):
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        HEADER + ZHANG                                   # line 2
        + "not-an-address,某人,营销部,,,,\n"              # line 3
        + "\n"                                           # line 4: blank, ignored
        + 'wang.wu@example.test,"王五\n(借调)",计量中心,,,,\n'  # lines 5-6: a quoted break
        + "li.si@example.test,李四,营销部,,,,maybe\n"      # line 7
        + "zhang.san@example.test,张三,重复,,,,\n",        # line 8
        encoding="utf-8",
    )
    code, out, err = run_cli(capsys, config, "people", "import", str(csv_file))
    assert (code, out) == (0, "added 2, updated 0, skipped 3\n")
    assert "line 3: 'not-an-address' is not an email address" in err
    assert "line 7: vip must be yes or no" in err
    assert "line 8: zhang.san@example.test is already on line 2" in err
    rows = listed(capsys, config)
    assert sorted(rows) == ["wang.wu@example.test", "zhang.san@example.test"]
    assert rows["wang.wu@example.test"]["name"] == "王五 (借调)"
    assert rows["zhang.san@example.test"]["department"] == "城东供电所"


def test_a_file_nothing_can_be_read_from_fails(tmp_path, config, capsys):
    no_header = tmp_path / "a.csv"
    no_header.write_text("邮箱,姓名\nzhang.san@example.test,张三\n", encoding="utf-8")
    code, out, err = run_cli(capsys, config, "people", "import", str(no_header))
    assert code != 0 and out == ""
    assert "header lacks email, name, department, phone, location" in err
    all_bad = tmp_path / "b.csv"
    all_bad.write_text(HEADER + "nobody,某人,营销部,,,,\n", encoding="utf-8")
    code, _, err = run_cli(capsys, config, "people", "import", str(all_bad))
    assert code != 0 and "line 2: 'nobody' is not an email address" in err
    code, _, err = run_cli(capsys, config, "people", "import", str(tmp_path / "missing.csv"))
    assert code != 0 and "missing.csv" in err
    assert listed(capsys, config) == {}


def test_mail_adds_a_name_but_never_overwrites_the_directory(tmp_path):
    desk = make_desk(tmp_path)
    now = people_now()
    with desk.db.transaction() as session:
        people.store(session, [people.Entry("zhang.san@example.test", "张三", "营销部")],
                     ("name", "department"), "csv", now)
    with desk.db.transaction() as session:
        remember_person(session, "zhang.san@example.test", "Zhang San (Marketing)", now)
        remember_person(session, "new@example.test", "New", now)
    with desk.db.sessions() as session:
        assert session.get(Person, "zhang.san@example.test").name == "张三"
        assert session.get(Person, "zhang.san@example.test").department == "营销部"
        assert session.get(Person, "new@example.test").source == "mail"
        assert people.language_of(session, "new@example.test") is None
    desk.close()


def people_now():
    from support import Clock

    return Clock()()


# -- LDAP ------------------------------------------------------------------------------------


def ldap_config(tmp_path, slapd, unit, monkeypatch, **extra):
    monkeypatch.setenv("TEST_LDAP_PASSWORD", "service-secret")
    return desk_config(tmp_path, directory={
        "url": slapd.url, "bind_dn": "cn=mailflow,dc=example,dc=test",
        "password_env": "TEST_LDAP_PASSWORD", "base_dn": unit,
        "filter": "(&(objectClass=inetOrgPerson)(mail=*))", "schedule": "30m",
        "attributes": {"vip": "employeeType"}, **extra,
    })


def seed(slapd, unit):
    slapd.add_person(unit, "zhangsan", mail="Zhang.San@example.test", displayName="张三",
                     department="城东供电所", telephoneNumber="0871-6501234",
                     physicalDeliveryOfficeName="城东供电所3楼301", preferredLanguage="zh-CN")
    slapd.add_person(unit, "lisi", mail="li.si@example.test", displayName="Li Si",
                     department="营销部", telephoneNumber="13800000000",
                     physicalDeliveryOfficeName="本部大楼5楼", preferredLanguage="en",
                     employeeType="VIP")
    slapd.add_person(unit, "nomail", displayName="没有邮箱")  # the filter leaves it out


def test_people_sync_reads_the_directory_over_ldap(tmp_path, slapd, monkeypatch, capsys):
    unit = slapd.unit()
    seed(slapd, unit)
    config = ldap_config(tmp_path, slapd, unit, monkeypatch)
    assert run_cli(capsys, config, "people", "sync")[:2] == (0, "added 2, updated 0, skipped 0\n")
    rows = listed(capsys, config)
    assert sorted(rows) == ["li.si@example.test", "zhang.san@example.test"]
    zhang, li = rows["zhang.san@example.test"], rows["li.si@example.test"]
    assert (zhang["name"], zhang["department"], zhang["phone"], zhang["location"],
            zhang["language"], zhang["vip"], zhang["source"]) == (
        "张三", "城东供电所", "0871-6501234", "城东供电所3楼301", "zh-CN", False, "ldap")
    assert (li["language"], li["vip"]) == ("en", True)
    assert zhang["synced_at"] is not None
    desk = Desk(load_config(config))
    with desk.db.sessions() as session:
        assert people.language_of(session, "Li.Si@example.test") == "en"
    desk.close()

    # A second sync updates, it does not duplicate.
    assert run_cli(capsys, config, "people", "sync")[:2] == (0, "added 0, updated 2, skipped 0\n")


def test_a_directory_larger_than_the_servers_size_limit_is_read_page_by_page(
    tmp_path, slapd, monkeypatch, capsys
):
    from ldapserver import SIZE_LIMIT

    unit = slapd.unit()
    for n in range(SIZE_LIMIT * 2 + 1):
        slapd.add_person(unit, f"user{n}", mail=f"user{n}@example.test", department="营销部")
    config = ldap_config(tmp_path, slapd, unit, monkeypatch)
    unpaged = subprocess.run(
        ["ldapsearch", "-x", "-H", slapd.url, "-D", "cn=mailflow,dc=example,dc=test",
         "-w", "service-secret", "-b", unit, "(mail=*)", "mail"],
        capture_output=True, text=True, timeout=30, check=False)
    assert "Size limit exceeded" in unpaged.stdout + unpaged.stderr  # the server caps answers
    monkeypatch.setattr(people, "PAGE_SIZE", SIZE_LIMIT)
    code, out, _ = run_cli(capsys, config, "people", "sync")
    assert (code, out) == (0, f"added {SIZE_LIMIT * 2 + 1}, updated 0, skipped 0\n")


def test_a_wrong_password_or_server_fails_in_one_sentence(tmp_path, slapd, monkeypatch, capsys):
    unit = slapd.unit()
    config = ldap_config(tmp_path, slapd, unit, monkeypatch)
    monkeypatch.setenv("TEST_LDAP_PASSWORD", "wrong")
    code, out, err = run_cli(capsys, config, "people", "sync")
    assert code != 0 and out == ""
    assert f"the directory {slapd.url} cannot be read" in err and "\n" not in err.strip()


def test_the_scheduled_sync_runs_once_per_period(tmp_path, slapd, monkeypatch):
    unit = slapd.unit()
    seed(slapd, unit)
    desk = Desk(load_config(ldap_config(tmp_path, slapd, unit, monkeypatch)))
    job = next(j for j in jobs.load_all() if j.name == "directory_sync")
    assert job.enabled(desk.settings) and job.catch_up
    now = people_now()
    first = jobs.run(job, desk, now)
    assert (first.added, first.updated) == (2, 0)
    assert jobs.run(job, desk, now + timedelta(minutes=5)) is None  # same period: done
    later = jobs.run(job, desk, now + timedelta(minutes=31))
    assert (later.added, later.updated) == (0, 2)
    desk.close()


class NotInstalled:
    """Finds ldap3 nowhere, as on a machine without the [ldap] extra."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "ldap3":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def test_check_names_a_missing_ldap3_when_directory_is_configured(
    tmp_path, slapd, monkeypatch, capsys
):
    config = ldap_config(tmp_path, slapd, "ou=x,dc=example,dc=test", monkeypatch)
    assert run_cli(capsys, config, "check")[0] == 0
    for name in [m for m in sys.modules if m == "ldap3" or m.startswith("ldap3.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled(), *sys.meta_path])
    code, out, _ = run_cli(capsys, config, "check")
    assert code == 1
    assert ("directory.url: the LDAP people directory is on, but ldap3 is not installed: "
            "pip install 'mailflow[ldap]'") in out
    code, out, err = run_cli(capsys, config, "people", "sync")
    assert code != 0 and "ldap3 is not installed: pip install 'mailflow[ldap]'" in err
    (tmp_path / "plain").mkdir()
    assert run_cli(capsys, desk_config(tmp_path / "plain"), "check")[0] == 0  # no [directory]


# -- the requester's details in the notice and the ticket, rules, VIP ---------------------


def load_people(desk, tmp_path, capsys, rows: str) -> None:
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(HEADER + rows, encoding="utf-8")
    assert run_cli(capsys, desk.settings.path, "people", "import", str(csv_file))[0] == 0


def test_l1_notice_and_show_carry_department_phone_and_location(
    desk, mailbox, smtp, clock, tmp_path, capsys
):
    load_people(desk, tmp_path, capsys, ZHANG)
    mailbox.append(make_mail("zhang.san@example.test", "电脑蓝屏", "开机蓝屏。", name="张三"))
    mailbox.append(make_mail("stranger@example.test", "电脑蓝屏", "开机蓝屏。"))
    assert run_once(desk, clock).processed == 2
    notices = [m for m in smtp.messages if "desk1@example.test" in m.rcpt_tos]
    assert len(notices) == 2
    known, unknown = sorted(notices, key=lambda m: "stranger" in body_of(m.content))
    text = body_of(known.content)
    assert "部门：城东供电所　电话：0871-6501234　办公地点：城东供电所3楼301" in text
    assert "报告人：张三 <zhang.san@example.test>\n" in text
    assert "部门：" not in body_of(unknown.content)
    assert "登记时间" in body_of(unknown.content)  # the summary is unchanged without details

    code, out, _ = run_cli(capsys, desk.settings.path, "show", "INC-1", "--json")
    details = json.loads(out)["requester_details"]
    assert code == 0 and details == {
        "name": "张三", "department": "城东供电所", "phone": "0871-6501234",
        "location": "城东供电所3楼301", "language": "zh-CN", "vip": False,
    }
    code, out, _ = run_cli(capsys, desk.settings.path, "show", "INC-1")
    assert "  department: 城东供电所" in out and "    location: 城东供电所3楼301" in out
    code, out, _ = run_cli(capsys, desk.settings.path, "show", "INC-2", "--json")
    assert json.loads(out)["requester_details"]["department"] is None


def test_the_english_major_incident_alert_carries_them_too(tmp_path, mailbox, smtp, clock,
                                                            capsys):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, desk={"language": "en"})
    load_people(desk, tmp_path, capsys, LI)
    mailbox.append(make_mail("li.si@example.test", "营销系统大面积无法登录",
                             "所有用户都无法登录营销系统。"))
    run_once(desk, clock)
    alert = next(m for m in smtp.messages if "im@example.test" in m.rcpt_tos)
    assert "Department: 营销部  Phone: 13800000000  Office: 本部大楼5楼" in body_of(alert.content)
    desk.close()


SITE_RULE = """\
description = "城东供电所的电脑故障：所里的二线现场处理"
label = { zh-CN = "电脑", en = "Desktop" }

[match]
department = ["城东供电所"]
any = ["电脑", "蓝屏", "死机", "打印机"]

[score]
base = 20

[set]
kind = "incident"
category = "desktop"
priority = "P3"
tier = "L2"
desktop = true
"""


def test_a_rule_routes_by_the_requesters_department(tmp_path, mailbox, smtp, clock, capsys):
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "05-site-chengdong.toml").write_text(SITE_RULE, encoding="utf-8")
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, paths={"rules": str(rules)})
    load_people(desk, tmp_path, capsys, ZHANG + LI)
    mailbox.append(make_mail("zhang.san@example.test", "电脑蓝屏", "开机蓝屏。"))
    mailbox.append(make_mail("li.si@example.test", "电脑蓝屏", "开机蓝屏。"))
    run_once(desk, clock)
    code, out, _ = run_cli(capsys, desk.settings.path, "tickets", "--json")
    by_requester = {t["requester"]: t for t in json.loads(out)}
    assert (by_requester["zhang.san@example.test"]["rule"],
            by_requester["zhang.san@example.test"]["tier"]) == ("05-site-chengdong", "L2")
    assert (by_requester["li.si@example.test"]["rule"],
            by_requester["li.si@example.test"]["tier"]) == ("80-desktop", "L1")
    assert any("l2@example.test" in m.rcpt_tos for m in smtp.messages)  # the site's L2 told
    desk.close()


def test_department_and_location_are_checked_and_matched_normalised(tmp_path):
    from mailflow.rules import check_rules, load_rules

    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    (rules / "05-site.toml").write_text(
        SITE_RULE.replace('department = ["城东供电所"]', 'location = ["ＢＬＤＧ A  3F"]'),
        encoding="utf-8")
    assert check_rules(rules) == []
    ruleset = load_rules(rules)
    at = Person(address="a@example.test", location="bldg a 3f")
    assert ruleset.classify("电脑蓝屏", "", "a@example.test", at).rule == "05-site"
    assert ruleset.classify("电脑蓝屏", "", "a@example.test", None).rule == "80-desktop"
    (rules / "05-site.toml").write_text(
        SITE_RULE.replace('department = ["城东供电所"]', 'department = "城东供电所"'),
        encoding="utf-8")
    assert [p.key for p in check_rules(rules)] == ["match.department"]


@pytest.mark.parametrize(("vip_raise", "vip", "subject", "expected", "raised"), [
    (True, "是", "打印机卡纸", "P3", "P4"),     # the printer rule's P4 → P3
    (True, "是", "OA系统无法登录", "P2", "P3"),
    (True, "是", "营销系统大面积无法登录", "P1", None),  # never above P1
    (True, "否", "打印机卡纸", "P4", None),
    (False, "是", "打印机卡纸", "P4", None),
])
def test_vip_requesters_are_raised_one_step_when_configured(
    tmp_path, mailbox, smtp, clock, capsys, vip_raise, vip, subject, expected, raised
):
    desk = make_desk(tmp_path, mailbox=mailbox, smtp=smtp, directory={"vip_raise": vip_raise})
    load_people(desk, tmp_path, capsys, LI.replace(",是\n", f",{vip}\n"))
    mailbox.append(make_mail("li.si@example.test", subject, subject))
    run_once(desk, clock)
    code, out, _ = run_cli(capsys, desk.settings.path, "show", "INC-1", "--json")
    shown = json.loads(out)
    assert shown["priority"] == expected
    with desk.db.sessions() as session:
        opened = session.query(Event).filter_by(action="opened").one()
        assert opened.data.get("vip_raised_from") == raised
        assert opened.data["priority"] == expected
        if raised:
            assert f"VIP requester: {raised} → {expected}" in opened.detail
    if raised:  # the SLA follows the raised priority
        due = desk.due(expected, clock(), "resolve")
        assert shown["due_at"] == due.isoformat().replace("+00:00", "Z")
    desk.close()


def test_check_names_each_directory_problem_by_key(tmp_path, capsys):
    config = desk_config(tmp_path, directory={
        "url": "dc1.example.test", "schedule": "soon", "attributes": {"office": "l"},
    })
    code, out, _ = run_cli(capsys, config, "check")
    assert code == 1
    for key, says in (("directory.url", "must start with ldap:// or ldaps://"),
                      ("directory.base_dn", "required when url is set"),
                      ("directory.schedule", ""),
                      ("directory.attributes.office", "unknown field; known: email, name")):
        assert f"config.toml: {key}: {says}" in out
    off = desk_config(tmp_path, directory={"url": "ldaps://dc1.example.test", "base_dn": "dc=x",
                                           "schedule": "off"})
    assert run_cli(capsys, off, "check")[0] == 0
    job = next(j for j in jobs.load_all() if j.name == "directory_sync")
    assert not job.enabled(load_config(off))  # synced only by `mailflow people sync`
