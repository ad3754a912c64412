"""Tests for rule loading, checking and classification (mailflow.rules and rules/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailflow.errors import RuleError
from mailflow.rules import (
    LANGUAGES,
    Classification,
    Problem,
    RuleSet,
    check_rules,
    load_rules,
    load_rules_lenient,
)

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "rules"

SIGNATURE = (
    "\n\n--\n张三\n某市供电局 市场营销部 计量中心\n电话：0769-12345678\n"
    "邮箱：zhangsan@example.test\n"
)
DISCLAIMER = (
    "\n本邮件及其附件含有某市供电局的保密信息，仅限于发送给上面地址中列出的个人或群组。"
    "禁止任何其他人以任何形式使用（包括但不限于全部或部分地泄露、复制、或散发）本邮件中的信息。"
    "如果您错收了本邮件，请您立即电话或邮件通知发件人并删除本邮件！\n"
)

# subject, body, expected (rule, kind, category, priority, tier, major, desktop)
INC, REQ = "incident", "request"
CASES: list[tuple[str, str, tuple[str, str, str, str, str | None, bool, bool]]] = [
    # major incidents
    ("【紧急】营销系统全局无法登录", "全局用户都登录不上营销系统，业务无法办理，请尽快处理！",
     ("10-major-marketing", INC, "marketing", "P1", "L2", True, False)),
    ("电费收费大面积报错", "各营业厅收费时都提示“计费服务异常”。",
     ("10-major-marketing", INC, "marketing", "P1", "L2", True, False)),
    ("计量自动化主站瘫痪", "主站从早上8点开始瘫痪，多个供电所无法查看采集数据。",
     ("11-major-metering", INC, "metering", "P1", "L2", True, False)),
    ("整栋楼断网", "办公楼整栋楼都上不了网，包括内网和外网。",
     ("12-major-network", INC, "network", "P1", "L2", True, False)),
    ("全所无法上网", "莞城供电所全所电脑都无法上网，急！",
     ("12-major-network", INC, "network", "P1", "L2", True, False)),
    ("Network outage on 3rd floor", "The whole office has no network since 9am.",
     ("12-major-network", INC, "network", "P1", "L2", True, False)),
    ("OA系统瘫痪", "OA系统打不开，所有人都无法处理公文。",
     ("19-major", INC, "major", "P1", "L2", True, False)),
    ("ERP outage", "All users get a timeout when opening ERP.",
     ("19-major", INC, "major", "P1", "L2", True, False)),
    # security
    ("发现钓鱼邮件", "今天收到一封可疑邮件，让我点击链接修改邮箱密码，是不是钓鱼邮件？",
     ("20-security", INC, "security", "P2", "L1", False, False)),
    ("电脑中毒了", "电脑右下角一直弹窗，杀毒软件报告发现木马。",
     ("20-security", INC, "security", "P2", "L1", False, False)),
    ("文件被加密", "共享盘上的文件后缀都变了，桌面出现勒索信息。",
     ("20-security", INC, "security", "P2", "L1", False, False)),
    ("Suspicious email - phishing?", "I received an email asking me to verify my password.",
     ("20-security", INC, "security", "P2", "L1", False, False)),
    # faults whose writer asks for handling (申请处理, 申请报修) are still incidents
    ("收不到外部邮件", "从昨天开始收不到外部邮件，内部邮件正常，申请处理。",
     ("55-email", INC, "email", "P3", "L1", False, False)),
    ("VPN连接超时", "在家连接VPN提示超时，申请处理一下。",
     ("65-network", INC, "network", "P3", "L1", False, False)),
    ("打印机打印不出来", "三楼打印机打印不出来，申请处理。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("电脑没有声音", "我的电脑开机没有声音，申请报修。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    # service requests
    ("申请开通VPN账号", "因出差需要，申请开通VPN账号，谢谢。",
     ("30-request-network-access", REQ, "network-access", "P4", None, False, False)),
    ("申请网络端口", "新调入同事座位需要开通一个网口。",
     ("30-request-network-access", REQ, "network-access", "P4", None, False, False)),
    ("新员工账号申请", "新员工李四下周一入职，请开通域账号和邮箱。",
     ("31-request-account", REQ, "account", "P4", None, False, False)),
    ("Request: new account for contractor", "Please create an account for Wang Wu.",
     ("31-request-account", REQ, "account", "P4", None, False, False)),
    ("营销系统权限申请", "申请开通营销系统业扩模块的查询权限。",
     ("32-request-permission", REQ, "permission", "P4", None, False, False)),
    ("共享文件夹访问", "请帮忙增加我对财务共享文件夹的读写权限。",
     ("32-request-permission", REQ, "permission", "P4", None, False, False)),
    ("申请领用一台显示器", "工作需要，申请领用一台24寸显示器。",
     ("34-request-hardware", REQ, "hardware", "P4", None, False, False)),
    ("领用硒鼓", "办公室打印机硒鼓快用完了，申领两个硒鼓。",
     ("34-request-hardware", REQ, "hardware", "P4", None, False, False)),
    ("New laptop", "I would like to request a laptop for our new engineer.",
     ("34-request-hardware", REQ, "hardware", "P4", None, False, False)),
    ("安装软件申请", "申请安装Visio软件，用于绘制流程图。",
     ("33-request-software", REQ, "software", "P4", None, False, False)),
    ("申请安装防病毒软件", "新电脑还没有防病毒软件，申请安装。",
     ("33-request-software", REQ, "software", "P4", None, False, False)),
    ("申请打印机驱动安装", "新到的打印机，需要安装驱动。",
     ("33-request-software", REQ, "software", "P4", None, False, False)),
    ("会议室投影申请", "下周三上午申请使用三楼会议室视频会议设备。",
     ("39-request-other", REQ, "other", "P4", None, False, False)),
    # business systems
    ("营销系统报错", "营销系统打开抄核收模块时报错：服务器内部错误。",
     ("40-marketing", INC, "marketing", "P2", "L1", False, False)),
    ("电费发票打印不了", "营业厅电费发票无法打印，提示模板错误。",
     ("40-marketing", INC, "marketing", "P2", "L1", False, False)),
    ("计量自动化主站数据采集失败", "台区集中器昨天起采集失败，采集成功率下降。",
     ("45-metering", INC, "metering", "P2", "L1", False, False)),
    ("电能表数据异常", "用户电能表示数跳变，请核查。",
     ("45-metering", INC, "metering", "P2", "L1", False, False)),
    ("OA公文流转报错", "在OA里发文时流转到下一步报错。",
     ("50-oa", INC, "oa", "P3", "L1", False, False)),
    ("待办打不开", "办公自动化系统里待办事项点开是空白。",
     ("50-oa", INC, "oa", "P3", "L1", False, False)),
    ("申请单提交不了", "OA里的请假申请单提交不了，一直转圈。",
     ("50-oa", INC, "oa", "P3", "L1", False, False)),
    # e-mail
    ("收不到外部邮件", "从昨天开始收不到外部邮件，内部邮件正常。",
     ("55-email", INC, "email", "P3", "L1", False, False)),
    ("Outlook一直提示输入密码", "打开Outlook后反复弹出密码框。",
     ("55-email", INC, "email", "P3", "L1", False, False)),
    ("邮箱满了", "邮箱提示已满，发不出邮件。",
     ("55-email", INC, "email", "P3", "L1", False, False)),
    ("Cannot send email", "Since this morning I cannot send email to external addresses.",
     ("55-email", INC, "email", "P3", "L1", False, False)),
    ("邮件问题", "麻烦看一下我的邮件，附件下载很慢。",
     ("56-email-subject", INC, "email", "P3", "L1", False, False)),
    # printer
    ("打印机卡纸", "三楼打印机卡纸了，取不出来。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("打印机坏了", "打印出来全是黑条。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("网络打印机无法打印", "连接网络打印机后打印任务一直排队。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("Printer offline", "The printer on floor 2 shows offline.",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    # network
    ("上不了网", "我的电脑今天上不了网，网线插着。",
     ("65-network", INC, "network", "P3", "L1", False, False)),
    ("VPN连不上", "在家连接VPN提示超时。",
     ("65-network", INC, "network", "P3", "L1", False, False)),
    ("Wi-Fi信号差", "会议室的无线网经常掉线。",
     ("65-network", INC, "network", "P3", "L1", False, False)),
    ("No internet", "My laptop has no internet access via WiFi.",
     ("65-network", INC, "network", "P3", "L1", False, False)),
    # accounts
    ("Please reset my password", "I forgot my password, please reset it.",
     ("70-accounts", INC, "account", "P3", "L1", False, False)),
    ("账号被锁定", "输错几次密码，域账号被锁定了。",
     ("70-accounts", INC, "account", "P3", "L1", False, False)),
    ("忘记密码", "忘记了电脑开机密码。",
     ("70-accounts", INC, "account", "P3", "L1", False, False)),
    # desktop
    ("我的电脑蓝屏了", "开机后蓝屏，提示 CRITICAL_PROCESS_DIED。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    ("电脑开不了机", "按电源键没有反应。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    ("显示器不亮", "主机在运行，显示器黑屏。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    ("Ｗｏｒｄ打不开", "双击文档没有反应。",  # full-width subject
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    ("PC very slow", "My computer freezes every few minutes.",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    ("显示器坏了，申请更换", "显示器屏幕有一条竖线。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    # a department, a form or a business system's print function named beside the device
    ("营销部3楼打印机无法打印", "营销部3楼的公用打印机从早上开始无法打印。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("打印不了抄表单", "今天要打抄表单，点了打印没反应。",
     ("60-printer", INC, "printer", "P4", "L1", False, True)),
    ("打印电费发票报错", "在营销系统里打印电费发票提示“打印模板加载失败”，打印机是好的。",
     ("40-marketing", INC, "marketing", "P2", "L1", False, False)),
    ("抄表班电脑特别卡", "抄表班的电脑最近特别卡，开机以后点什么都要转半天。",
     ("80-desktop", INC, "desktop", "P3", "L1", False, True)),
    # default
    ("咨询", "请问下周的培训在哪个会议室？",
     ("99-default", INC, "other", "P3", "L1", False, True)),
    ("Question", "Where can I download the roadmap document?",
     ("99-default", INC, "other", "P3", "L1", False, True)),
]


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_rules(RULES_DIR)


def test_default_rules_are_clean() -> None:
    assert check_rules(RULES_DIR) == []


@pytest.mark.parametrize(("subject", "body", "expected"), CASES, ids=[c[0] for c in CASES])
def test_classify_examples(ruleset: RuleSet, subject: str, body: str, expected: tuple) -> None:
    c = ruleset.classify(subject, body)
    got = (c.rule, c.kind, c.category, c.priority, c.tier, c.major, c.desktop)
    assert got == expected
    assert (c.request_type is None) == (c.kind == "incident")


@pytest.mark.parametrize(("subject", "body", "expected"), CASES, ids=[c[0] for c in CASES])
def test_signature_and_disclaimer_do_not_change_the_rule(
    ruleset: RuleSet, subject: str, body: str, expected: tuple
) -> None:
    assert ruleset.classify(subject, body + SIGNATURE + DISCLAIMER).rule == expected[0]


def test_request_has_type(ruleset: RuleSet) -> None:
    c = ruleset.classify("申请开通VPN账号", "")
    assert c == Classification(
        rule="30-request-network-access", kind="request", category="network-access",
        priority="P4", tier=None, major=False, desktop=False, request_type="network-access",
    )


def test_body_is_truncated(ruleset: RuleSet) -> None:
    body = "你好。" * 3000 + "打印机卡纸"
    assert ruleset.classify("求助", body).rule == "99-default"


# --- helpers for rule directories written into tmp_path -----------------------------------

DEFAULT = 'description = "default"\n[set]\nkind = "incident"\ncategory = "other"\npriority = "P3"\n'


def rule(match: str, kind: str = "incident", category: str = "network",
         priority: str = "P3", extra: str = "") -> str:
    return (f"[match]\n{match}\n[set]\nkind = \"{kind}\"\ncategory = \"{category}\"\n"
            f"priority = \"{priority}\"\n{extra}")


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def keyed(problems: list[Problem]) -> set[tuple[str, str]]:
    return {(Path(p.file).name, p.key) for p in problems}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"10-bad.toml": 'description = "x"\n[match\nany = ["a"]\n', "99-default.toml": DEFAULT},
         {("10-bad.toml", "")}),
        ({"10-p9.toml": rule('any = ["网络"]', priority="P9"), "99-default.toml": DEFAULT},
         {("10-p9.toml", "set.priority")}),
        ({"10-unknown.toml": rule('any = ["网络"]\nkeywords = ["x"]'), "99-default.toml": DEFAULT},
         {("10-unknown.toml", "match.keywords")}),
        ({"10-top.toml": "owner = 'x'\n" + rule('any = ["网络"]'), "99-default.toml": DEFAULT},
         {("10-top.toml", "owner")}),
        ({"10-re.toml": rule('regex = "网络("'), "99-default.toml": DEFAULT},
         {("10-re.toml", "match.regex")}),
        ({"10-type.toml": rule('any = "网络"'), "99-default.toml": DEFAULT},
         {("10-type.toml", "match.any")}),
        ({"10-kind.toml": rule('any = ["a"]', kind="problem"), "99-default.toml": DEFAULT},
         {("10-kind.toml", "set.kind")}),
        ({"10-tier.toml": rule('any = ["a"]', extra='tier = "L5"\n'), "99-default.toml": DEFAULT},
         {("10-tier.toml", "set.tier")}),
        ({"10-major.toml": rule('any = ["a"]', extra='major = true\ntier = "L3"\n'),
          "99-default.toml": DEFAULT},
         {("10-major.toml", "set.tier")}),
        ({"10-flag.toml": rule('any = ["a"]', extra='desktop = "yes"\n'),
          "99-default.toml": DEFAULT},
         {("10-flag.toml", "set.desktop")}),
        ({"10-req.toml": rule('any = ["a"]', kind="request", extra='tier = "L1"\n'),
          "99-default.toml": DEFAULT},
         {("10-req.toml", "set.tier"), ("10-req.toml", "set.request_type")}),
        ({"10-empty.toml": rule(""), "99-default.toml": DEFAULT},
         {("10-empty.toml", "match")}),
        ({"10-dom.toml": rule('from_domain = ["not a domain"]'), "99-default.toml": DEFAULT},
         {("10-dom.toml", "match.from_domain")}),
        ({"10-net.toml": rule('any = ["网络"]')}, {("rules", "")}),
        ({"50-default.toml": DEFAULT, "60-net.toml": rule('any = ["网络"]')},
         {("50-default.toml", "match")}),
        ({"README.md": "no rules here"}, {("rules", "")}),
    ],
    ids=["toml-syntax", "priority-p9", "unknown-match-key", "unknown-top-key", "bad-regex",
         "wrong-type", "bad-kind", "bad-tier", "major-not-l2", "flag-type", "request-tier",
         "empty-match", "bad-domain", "no-default", "default-not-last", "empty-dir"],
)
def test_check_rules_problems(
    tmp_path: Path, files: dict[str, str], expected: set[tuple[str, str]]
) -> None:
    problems = check_rules(write(tmp_path / "rules", files))
    assert keyed(problems) == expected
    with pytest.raises(RuleError) as err:
        load_rules(tmp_path / "rules")
    for p in problems:
        assert str(p) in str(err.value)


def test_problem_messages(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-bad.toml": 'description = "x"\n\n[match\n',
        "40-network.toml": rule('any = ["网络"]', priority="P9"),
        "99-default.toml": DEFAULT,
    })
    bad, p9 = check_rules(d)
    assert "line 3" in bad.message
    assert str(p9) == (f"{d / '40-network.toml'}: set.priority: "
                       "must be one of P1, P2, P3, P4, got 'P9'")


def test_missing_directory(tmp_path: Path) -> None:
    assert keyed(check_rules(tmp_path / "nope")) == {("nope", "")}


def test_several_problems_in_one_file(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-x.toml": rule('any = []\nregex = "("', kind="x", priority="P0"),
        "99-default.toml": DEFAULT,
    })
    assert keyed(check_rules(d)) == {
        ("10-x.toml", k) for k in ("match.any", "match.regex", "set.kind", "set.priority")
    }


def test_lenient_keeps_good_rules(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-bad.toml": rule('any = ["网络"]', priority="P9"),
        "20-printer.toml": rule('any = ["打印机"]', category="printer", priority="P4"),
        "30-broken.toml": "[match",
        "99-default.toml": DEFAULT,
    })
    rs, problems = load_rules_lenient(d)
    assert [r.name for r in rs.rules] == ["20-printer", "99-default"]
    assert {Path(p.file).name for p in problems} == {"10-bad.toml", "30-broken.toml"}
    assert rs.classify("打印机卡纸", "").rule == "20-printer"
    assert rs.classify("网络断了", "").rule == "99-default"


def test_lenient_appends_builtin_default(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-net.toml": rule('any = ["网络"]'),
        "50-default.toml": DEFAULT,
        "60-print.toml": rule('any = ["打印"]', category="printer"),
        "99-default.toml": DEFAULT.replace("P3", "P9"),
    })
    rs, problems = load_rules_lenient(d)
    assert [r.name for r in rs.rules] == ["10-net", "60-print", "builtin-default"]
    assert keyed(problems) == {("50-default.toml", "match"), ("99-default.toml", "set.priority")}
    c = rs.classify("咨询", "")
    assert (c.kind, c.category, c.priority, c.tier, c.desktop) == (
        "incident", "other", "P3", "L1", True)


def test_lenient_empty_directory(tmp_path: Path) -> None:
    rs, problems = load_rules_lenient(tmp_path)
    assert len(problems) == 1 and rs.classify("x", "y").rule == "builtin-default"


def test_first_match_wins_in_file_name_order(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "20-network.toml": rule('any = ["网络"]'),
        "10-printer.toml": rule('any = ["打印"]', category="printer"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert [r.name for r in rs.rules] == ["10-printer", "20-network", "99-default"]
    assert rs.classify("网络打印机坏了", "").category == "printer"
    assert rs.classify("网络断了", "").category == "network"


def test_major_forces_l2(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-major.toml": rule('any = ["瘫痪"]', priority="P1", extra="major = true\n"),
        "99-default.toml": DEFAULT,
    })
    c = load_rules(d).classify("系统瘫痪", "")
    assert (c.major, c.tier, c.priority) == (True, "L2", "P1")
    assert load_rules(d).classify("x", "").tier == "L1"  # tier defaults to L1


def test_match_conditions(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-all.toml": rule('all = ["营销", "报错"]', category="marketing"),
        "20-subject.toml": rule('subject_any = ["OA"]', category="oa"),
        "30-none.toml": rule('any = ["网络"]\nnone = ["打印"]'),
        "40-regex.toml": rule(r'regex = "^工单\\s*\\d+"', category="ticket"),
        "50-domain.toml": rule('from_domain = ["vendor.test"]\nany = ["巡检"]',
                               category="vendor"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("营销系统", "打开就报错").category == "marketing"
    assert rs.classify("营销系统", "很慢").category == "other"
    assert rs.classify("OA 打不开", "").category == "oa"
    assert rs.classify("求助", "oa 打不开").category == "other"
    assert rs.classify("求助", "网络不通").category == "network"
    assert rs.classify("求助", "网络打印机").category == "other"
    assert rs.classify("求助", "工单 123 请处理").category == "ticket"
    assert rs.classify("巡检报告", "", "李工 <li@ops.vendor.test>").category == "vendor"
    assert rs.classify("巡检报告", "", "li@evilvendor.test").category == "other"
    assert rs.classify("巡检报告", "").category == "other"


def test_normalisation_and_word_starts(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-oa.toml": rule('any = ["OA", "ＶＰＮ"]', category="oa"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("ｏａ系统打不开", "").category == "oa"  # full-width, case
    assert rs.classify("vpn", "").category == "oa"
    assert rs.classify("OA审批", "").category == "oa"
    assert rs.classify("download failed", "").category == "other"  # not a word start
    assert rs.classify("on the road", "").category == "other"


def test_redundant_keywords_keep_word_starts(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-mail.toml": rule('any = ["mail", "email", "上网", "无法上网"]', category="email"),
        "20-all.toml": rule('all = ["print", "reprint"]', category="printer"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("email down", "").category == "email"
    assert rs.classify("无法上网", "").category == "email"
    assert rs.classify("hotmail", "").category == "other"
    assert rs.classify("reprint", "").category == "other"  # "print" not at a word start
    assert rs.classify("reprint and print", "").category == "printer"


def test_ruleset_needs_default(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {"10-net.toml": rule('any = ["网络"]'),
                                   "99-default.toml": DEFAULT})
    rs = load_rules(d)
    with pytest.raises(RuleError):
        RuleSet(rs.rules[:1])


# --- scoring: the best-scoring matching rule wins ------------------------------------------


def test_highest_score_wins_over_file_order(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-marketing.toml": rule('any = ["营销"]', category="marketing"),
        "20-printer.toml": rule('any = ["打印机", "打印"]', category="printer"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("营销部3楼打印机无法打印", "").category == "printer"
    assert rs.classify("营销部的问题", "").category == "marketing"


def test_subject_counts_double(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-network.toml": rule('any = ["网络"]'),
        "20-printer.toml": rule('any = ["打印"]', category="printer"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("打印不了", "连的是网络打印").category == "printer"
    assert rs.classify("网络不通", "打印也不行").category == "network"
    assert [(r.name, n) for r, n in rs.scores("打印不了", "网络打印")] == [
        ("10-network", 1), ("20-printer", 2), ("99-default", 0)]


def test_longest_keyword_counts_once(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-printer.toml": rule('any = ["打印", "打印机"]', category="printer"),
        "20-network.toml": rule('any = ["网络", "无法"]'),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    # 打印机 counts 2 (in the subject), not also the 打印 inside it: 网络 + 无法 win.
    assert rs.classify("网络打印机无法使用", "").category == "network"
    # a keyword counts once however often it occurs
    assert rs.classify("打印机", "打印 打印 打印 网络 无法").category == "printer"


def test_strong_against_and_base(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-metering.toml": rule('any = ["抄表", "采集"]\n[score]\nagainst = ["抄表单"]\n'
                                 'strong = ["集中器"]', category="metering"),
        "20-printer.toml": rule('any = ["打印"]', category="printer"),
        "30-major.toml": rule('any = ["瘫痪"]\n[score]\nbase = 100', category="major",
                              priority="P1", extra="major = true\n"),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert rs.classify("抄表单打印不出来", "").category == "printer"
    assert rs.classify("抄表单丢了", "").category == "other"  # against outweighs: default
    assert rs.classify("抄表数据上传失败", "附上抄表单").category == "metering"  # 2 - 1
    assert rs.classify("打印不了", "采集失败，集中器离线").category == "metering"  # 1 + 3 > 2
    assert rs.classify("求助", "集中器").category == "other"  # strong words do not match
    assert rs.classify("打印打印打印", "主站瘫痪").category == "major"


def test_rules_without_keywords_still_win_ties(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-ticket.toml": rule(r'regex = "^工单\\s*\\d+"', category="ticket"),
        "99-default.toml": DEFAULT,
    })
    assert load_rules(d).classify("求助", "工单 123").category == "ticket"


def test_labels(tmp_path: Path) -> None:
    d = write(tmp_path / "rules", {
        "10-printer.toml": 'label = { zh-CN = "打印机", en = "Printer" }\n'
                           + rule('any = ["打印"]', category="printer"),
        "20-scanner.toml": rule('any = ["扫描"]', category="printer"),
        "30-net.toml": 'label = { en = "Network" }\n' + rule('any = ["网络"]'),
        "99-default.toml": DEFAULT,
    })
    rs = load_rules(d)
    assert (rs.label("printer", "zh-CN"), rs.label("printer", "en")) == ("打印机", "Printer")
    assert (rs.label("network", "en"), rs.label("network", "zh-CN")) == ("Network", "network")
    assert rs.label("紧急", "zh-CN") == "紧急"  # a category no rule labels: its code


def test_shipped_rules_have_labels(ruleset: RuleSet) -> None:
    for r in ruleset.rules:
        assert r.label is not None and set(r.label) == set(LANGUAGES), r.name
    assert ruleset.label("printer", "zh-CN") == "打印机"
    assert ruleset.label("printer", "en") == "Printer"


def test_packaged_rules_are_the_shipped_rules() -> None:
    packaged = ROOT / "mailflow" / "default" / "rules"
    names = sorted(p.name for p in RULES_DIR.iterdir())
    assert sorted(p.name for p in packaged.iterdir()) == names
    for name in names:
        assert (packaged / name).read_bytes() == (RULES_DIR / name).read_bytes(), name


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"10-x.toml": rule('any = ["a"]\n[score]\nbase = "high"')}, {("10-x.toml", "score.base")}),
        ({"10-x.toml": rule('any = ["a"]\n[score]\nbase = true')}, {("10-x.toml", "score.base")}),
        ({"10-x.toml": rule('any = ["a"]\n[score]\nstrong = "b"')},
         {("10-x.toml", "score.strong")}),
        ({"10-x.toml": rule('any = ["a"]\n[score]\nweak = ["b"]')}, {("10-x.toml", "score.weak")}),
        ({"10-x.toml": rule('any = ["a"]\n[score]\nagainst = ["a"]')},
         {("10-x.toml", "score.against")}),
        ({"10-x.toml": 'score = 3\n' + rule('any = ["a"]')}, {("10-x.toml", "score")}),
        ({"10-x.toml": 'label = "打印机"\n' + rule('any = ["a"]')}, {("10-x.toml", "label")}),
        ({"10-x.toml": 'label = { zh_CN = "打印机" }\n' + rule('any = ["a"]')},
         {("10-x.toml", "label.zh_CN")}),
        ({"10-x.toml": 'label = { en = " " }\n' + rule('any = ["a"]')},
         {("10-x.toml", "label.en")}),
        ({"10-x.toml": 'label = { en = "Printer" }\n' + rule('any = ["a"]', category="printer"),
          "20-y.toml": 'label = { en = "Printing" }\n' + rule('any = ["b"]', category="printer")},
         {("20-y.toml", "label.en")}),
        ({"99-default.toml": DEFAULT + '[score]\nstrong = ["a"]\n'},
         {("99-default.toml", "score.strong")}),
    ],
    ids=["base-type", "base-bool", "strong-type", "unknown-score-key", "both-ways",
         "score-not-table", "label-not-table", "label-language", "label-empty", "label-clash",
         "default-keywords"],
)
def test_score_and_label_problems(
    tmp_path: Path, files: dict[str, str], expected: set[tuple[str, str]]
) -> None:
    files.setdefault("99-default.toml", DEFAULT)
    problems = check_rules(write(tmp_path / "rules", files))
    assert keyed(problems) == expected
    with pytest.raises(RuleError):
        load_rules(tmp_path / "rules")
