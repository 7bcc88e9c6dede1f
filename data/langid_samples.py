"""A small hand-labelled language-ID set: long and short text, en/zh code-switching, other languages.

Each sample is `(text, label, kind)`; `label` is an ISO 639-1 code, `"en+zh"` for mixed text (either
answer is right, and both are kept), and `kind` is `long`, `short`, `mixed` or `code`
(Python with English comments, as in the embedded corpus). Used by
`benchmarks/clean_langid.py` to pick the detector and by the tests to hold it to its measured accuracy.
"""

from __future__ import annotations

EN_LONG = [
    "The committee will publish its final report on the proposed railway extension next spring.",
    "Most of the rain falls between November and March, when storms roll in from the Atlantic.",
    "She opened the drawer, found the old letters, and read them slowly by the window.",
    "Researchers measured how quickly the enzyme breaks down starch at different temperatures.",
    "If the function receives an empty list, it returns None instead of raising an exception.",
    "Our neighbours planted tomatoes, beans and a row of sunflowers along the fence this year.",
    "The museum reopened after a two-year renovation with a new wing devoted to maritime history.",
    "Interest rates rose for the third time this year as the central bank tried to slow inflation.",
    "Please make sure every contributor signs the licence agreement before the pull request is merged.",
    "The bridge was designed to sway slightly in strong winds rather than resist them rigidly.",
    "Children who read for pleasure tend to develop a broader vocabulary than those who do not.",
    "A compiler translates source code into machine instructions before the program is executed.",
]
EN_SHORT = [
    "Good morning!",
    "Thanks a lot.",
    "Where is the station?",
    "It works now.",
    "See you tomorrow",
    "Read the manual",
    "Open the window",
    "I love this song",
    "Not bad at all",
    "Happy birthday",
    "Call me later",
    "What time is it?",
    "No problem",
    "Sounds good to me",
    "Keep it simple",
    "Where are my keys?",
]
ZH_LONG = [
    "今天天气很好，我们一起去公园散步吧。",
    "这家餐厅的菜味道不错，价格也很合理，周末常常要排队。",
    "研究人员发现，适量运动可以明显改善睡眠质量和情绪。",
    "如果函数接收到空列表，就返回空值，而不是抛出异常。",
    "北京是中国的首都，也是全国的政治和文化中心。",
    "这本书讲述了一个年轻人离开家乡、到大城市闯荡的故事。",
    "政府计划明年在西部地区修建三条新的高速铁路。",
    "孩子们放学后在操场上踢足球，一直玩到天黑才回家。",
    "這座橋在強風中會輕微搖擺，而不是硬性抵抗風力。",
    "我們的鄰居今年在籬笆旁種了番茄、豆子和一排向日葵。",
    "博物館經過兩年的翻修後重新開放，新增了海洋歷史展區。",
    "请在合并代码之前，确保每位贡献者都签署了许可协议。",
]
ZH_SHORT = [
    "你好",
    "谢谢你",
    "我爱你",
    "火车站在哪里？",
    "明天见",
    "打开窗户",
    "今天很热",
    "學習中文",
    "没问题",
    "我很好",
    "生日快乐",
    "几点了？",
    "请稍等",
    "太贵了",
    "下雨了",
    "谢谢大家的支持",
]
MIXED = [
    "我今天用 Python 写了一个小 script 来处理 CSV 文件。",
    "这个 bug 在 production 环境里才会出现，local 跑不出来。",
    "Please 把 meeting notes 发给我，thanks！",
    "The term 机器学习 means machine learning in Chinese.",
    "我们下午三点在 Starbucks 见面，然后一起去 office。",
    "In Chinese, 你好 is the usual way to say hello to someone.",
    "这个 API 的 response time 太长了，需要加 cache。",
    "He ordered 宫保鸡丁 and a bowl of rice at the restaurant downtown.",
    "老板说这个 project 的 deadline 是下周五。",
    "The sign said 禁止吸烟, which means no smoking.",
    "用 git rebase 之前记得先 pull 一下最新的 main branch。",
    "Our team in 上海 ships the new release next week.",
    "这篇 paper 的 related work 部分写得很好。",
    "Add 两勺 sugar and stir well.",
    "我觉得这个 design 比较 clean，代码也更 readable。",
]
CODE = [
    "def read_config(path):\n    # Load the settings file and return a dict of options.\n    with open(path) as f:\n"
    "        return json.load(f)\n",
    "class Cache:\n    \"\"\"A small least-recently-used cache that evicts the oldest entry when full.\"\"\"\n\n"
    "    def __init__(self, size=128):\n        self.size = size\n        self.items = {}\n",
    "for line in sys.stdin:\n    if not line.strip():\n        continue  # skip blank lines\n"
    "    print(line.upper(), end='')\n",
    "Return the number of items in the queue. Raises ValueError if the queue has been closed.",
    "if timeout is None:\n    raise TypeError('timeout must be a number of seconds, not None')\n",
]
OTHER = [
    ("Le comité publiera son rapport final sur le projet de prolongement ferroviaire au printemps.", "fr"),
    ("Elle ouvrit le tiroir, trouva les vieilles lettres et les lut lentement près de la fenêtre.", "fr"),
    ("Merci beaucoup", "fr"),
    ("Bonne nuit", "fr"),
    ("Der Ausschuss wird seinen Abschlussbericht über die geplante Bahnstrecke im Frühjahr vorlegen.", "de"),
    ("Die meisten Niederschläge fallen zwischen November und März, wenn Stürme vom Atlantik kommen.", "de"),
    ("Guten Morgen zusammen", "de"),
    ("Wie geht es dir?", "de"),
    ("El comité publicará su informe final sobre la ampliación del ferrocarril la próxima primavera.", "es"),
    ("Los niños que leen por placer suelen desarrollar un vocabulario más amplio que los demás.", "es"),
    ("¿Dónde está la estación?", "es"),
    ("Muchas gracias", "es"),
    ("Il museo ha riaperto dopo due anni di restauro con una nuova ala dedicata alla storia marittima.", "it"),
    ("I tassi di interesse sono saliti per la terza volta quest'anno.", "it"),
    ("A maior parte da chuva cai entre novembro e março, quando as tempestades chegam do Atlântico.", "pt"),
    ("Os pesquisadores mediram a rapidez com que a enzima decompõe o amido.", "pt"),
    ("De gemeente wil volgend jaar drie nieuwe fietspaden langs het kanaal aanleggen.", "nl"),
    ("Комитет опубликует окончательный доклад о продлении железной дороги следующей весной.", "ru"),
    ("Дети, которые читают для удовольствия, обычно знают больше слов.", "ru"),
    ("Спасибо большое", "ru"),
    ("今日はとても良い天気なので、公園を散歩しましょう。", "ja"),
    ("この関数は空のリストを受け取ると、例外を投げずに None を返します。", "ja"),
    ("ありがとうございます", "ja"),
    ("おはよう", "ja"),
    ("오늘은 날씨가 좋아서 공원에서 산책을 했습니다.", "ko"),
    ("위원회는 내년 봄에 최종 보고서를 발표할 예정입니다.", "ko"),
    ("감사합니다", "ko"),
    ("ستنشر اللجنة تقريرها النهائي عن مشروع توسيع السكك الحديدية في الربيع المقبل.", "ar"),
    ("Komite akan menerbitkan laporan akhirnya tentang perluasan jalur kereta api musim semi mendatang.", "id"),
    ("Ủy ban sẽ công bố báo cáo cuối cùng về dự án mở rộng đường sắt vào mùa xuân tới.", "vi"),
    ("Komitea julkaisee loppuraporttinsa rautatien jatkamisesta ensi keväänä.", "fi"),
    ("Komisja opublikuje końcowy raport w sprawie przedłużenia linii kolejowej na wiosnę.", "pl"),
    ("Komite, demiryolu uzatma projesine ilişkin nihai raporunu önümüzdeki bahar yayımlayacak.", "tr"),
]


def samples() -> list[tuple[str, str, str]]:
    """All samples as `(text, label, kind)`; kind ∈ {long, short, mixed, code}."""
    out = [(t, "en", "long") for t in EN_LONG] + [(t, "en", "short") for t in EN_SHORT]
    out += [(t, "zh", "long") for t in ZH_LONG] + [(t, "zh", "short") for t in ZH_SHORT]
    out += [(t, "en+zh", "mixed") for t in MIXED] + [(t, "en", "code") for t in CODE]
    out += [(t, lang, "short" if len(t) <= 24 else "long") for t, lang in OTHER]
    return out


def is_correct(label: str, predicted: str | None) -> bool:
    """Mixed en/zh text is right if called either en or zh."""
    return predicted in label.split("+")


def keep_correct(label: str, predicted: str | None, keep=("en", "zh")) -> bool:
    """Whether the keep/drop decision that follows from `predicted` matches the label's."""
    should_keep = any(lang in keep for lang in label.split("+"))
    return should_keep == (predicted in keep)
