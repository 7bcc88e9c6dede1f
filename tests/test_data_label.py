"""Domain tags: keywords count as whole words with punctuation split off, and only when frequent enough."""

from data.label import LabelConfig, domain_tags


def test_keywords_with_attached_punctuation_count():
    assert domain_tags("We state the theorem. Then the lemma, and finally the proof.") == ["math"]
    assert domain_tags("定理theorem与lemma") == ["math"]  # CJK next to a latin keyword splits it off
    # whole words only: "proofs" or "theorematic" are not keywords
    assert domain_tags("The proofs were theorematic and reproofed.") == []


def test_density_threshold_still_applies():
    long = "theorem lemma " + "word " * 5000
    assert domain_tags(long) == []
    assert domain_tags(long, LabelConfig(min_hits_per_1k_words=0.1)) == ["math"]


def test_code_and_math_tags_need_code_and_math():
    """Line-start code keywords and specific math terms: trade news and a motor race are neither."""
    from data.label import domain_tags

    en = ("The government announced new import tariffs on steel on Monday. Officials said the import duties would "
          "protect the working class and the middle class, and that the measures would return production to "
          "domestic mills. Critics said higher prices would hurt consumers in return for modest gains.")
    zh = ("今天上午，2024年中国汽车方程式大奖赛在上海开幕，来自各地的车队参加了比赛。入场观众需要出示身份证明，"
          "没有身份证明的观众不能进入赛场。主办方表示，方程式赛车运动在中国越来越受欢迎。")
    assert "code" not in domain_tags(en) and "math" not in domain_tags(zh)
    py = "import os\nfrom typing import Any\n\nclass A:\n    def f(self):\n        return self.x\n"
    assert "code" in domain_tags(py)
