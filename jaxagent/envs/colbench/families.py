"""The offline ColBench task families: small Python functions whose exact behaviour hangs on hidden details.

Each family is a request a user might make ("a function for an order's total with our bulk discount") whose right
answer depends on facts only the user knows (the discount's threshold and rate, whether the threshold itself
counts). A family gives, for one choice of those facts (its `params`): the reference function's source, test calls
that tell every fact's values apart, the facts as a user would state them, and the question an expert asks for each.
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Fact:
    """A hidden detail: the parameters it fixes, the words by which a question asks for it, the user's answer and
    the question an expert asks."""

    params: tuple[str, ...]
    keywords: tuple[str, ...]
    answer: str
    question: str


@dataclasses.dataclass(frozen=True)
class Family:
    """A request with hidden details: `grid` lists every detail's possible values."""

    name: str
    grid: dict[str, tuple]
    args: str  # the function's parameters, e.g. "unit_price, quantity"
    function_names: tuple[str, ...]
    requests: tuple[str, ...]  # vague requests, as a user phrases them
    defaults: dict  # what an agent that does not ask would likely assume
    code: Callable[[str, dict], str]  # (function name, params) -> the function's source
    arguments: Callable[[dict], list[str]]  # params -> the argument lists of the test calls, e.g. "(10.0, 4)"
    facts: Callable[[dict], list[Fact]]


def _discount_code(fn: str, p: dict) -> str:
    compare = ">=" if p["inclusive"] else ">"
    return (f"def {fn}(unit_price, quantity):\n    total = unit_price * quantity\n"
            f"    if quantity {compare} {p['threshold']}:\n        total = total * (1 - {p['rate']} / 100)\n"
            "    return round(total, 2)\n")


def _discount_facts(p: dict) -> list[Fact]:
    start = (f"The discount applies from {p['threshold']} items on." if p["inclusive"] else
             f"The discount applies only to orders of more than {p['threshold']} items.")
    return [Fact(("threshold", "inclusive"), ("how many", "threshold", "minimum", "quantity"), start,
                 "How many items does an order need before the bulk discount applies?"),
            Fact(("rate",), ("percent", "rate", "how big", "how large"), f"It is {p['rate']}% off the whole order.",
                 "How big is the discount, in percent?")]


DISCOUNT = Family(
    name="discount",
    grid={"threshold": (3, 5, 10, 12, 20, 25), "rate": (5, 10, 15, 20, 25, 30), "inclusive": (True, False)},
    args="unit_price, quantity",
    function_names=("order_total", "order_price", "checkout_total"),
    requests=("I need a function that works out what a customer pays for an order of identical items, with our "
              "bulk discount.",
              "Can you write me the price of an order? Big orders get a discount.",
              "Write the checkout total for a number of items at one unit price; we give a discount on bulk orders."),
    defaults={"threshold": 10, "rate": 10, "inclusive": True},
    code=_discount_code,
    arguments=lambda p: [f"(10.0, {p['threshold'] - 1})", f"(10.0, {p['threshold']})",
                         f"(10.0, {p['threshold'] + 1})", "(4.5, 1)", f"(19.99, {2 * p['threshold']})",
                         f"(3.25, {p['threshold'] + 3})", "(100.0, 0)", f"(7.0, {3 * p['threshold']})"],
    facts=_discount_facts,
)


def _shipping_code(fn: str, p: dict) -> str:
    return (f"def {fn}(weight_kg, distance_km):\n    cost = {p['base']} + {p['per_kg']} * weight_kg\n"
            f"    if distance_km > {p['far_km']}:\n        cost += {p['surcharge']}\n    return round(cost, 2)\n")


SHIPPING = Family(
    name="shipping",
    grid={"base": (2, 3, 4, 5, 8), "per_kg": (0.5, 1.0, 1.5, 2.0), "far_km": (50, 100, 200, 500),
          "surcharge": (3, 5, 10)},
    args="weight_kg, distance_km",
    function_names=("shipping_cost", "delivery_price", "parcel_fee"),
    requests=("I need a function for what we charge to ship a parcel.",
              "Write the delivery price of a package for our shop, please.",
              "Can you code up our parcel shipping cost? It depends on the parcel and where it goes."),
    defaults={"base": 5, "per_kg": 1.0, "far_km": 100, "surcharge": 5},
    code=_shipping_code,
    arguments=lambda p: ["(1, 10)", f"(2.5, {p['far_km'] - 1})", f"(2.5, {p['far_km'] + 1})", "(0, 0)",
                         f"(10, {2 * p['far_km']})", f"(3.2, {p['far_km']})", "(7, 1)", f"(0.4, {p['far_km'] + 50})"],
    facts=lambda p: [
        Fact(("base", "per_kg"), ("kilogram", "per kg", "weight", "base fee"),
             f"There is a {p['base']} dollar base fee plus {p['per_kg']} dollars per kilogram.",
             "How does the weight change the price, and is there a base fee?"),
        Fact(("far_km", "surcharge"), ("distance", "far", "km", "kilomet"),
             f"Beyond {p['far_km']} km we add a {p['surcharge']} dollar surcharge.",
             "Does the distance change the price?")],
)


def _grade_code(fn: str, p: dict) -> str:
    if p["invalid"] == "clamp":
        guard = "    score = min(max(score, 0), 100)\n"
    else:
        guard = f"    if score < 0 or score > 100:\n        return {p['invalid']!r}\n"
    return (f"def {fn}(score):\n{guard}    if score >= {p['a']}:\n        return 'A'\n"
            f"    if score >= {p['b']}:\n        return 'B'\n    if score >= {p['c']}:\n        return 'C'\n"
            "    return 'F'\n")


_OUT_OF_RANGE = {"invalid": "Scores below 0 or above 100 should give 'invalid'.",
                 "F": "Scores below 0 or above 100 are mistakes and get an F.",
                 "clamp": "Treat a score above 100 as 100 and one below 0 as 0."}

GRADE = Family(
    name="grade",
    grid={"a": (85, 88, 90, 93), "b": (70, 75, 78, 80), "c": (55, 60, 65), "invalid": ("invalid", "F", "clamp")},
    args="score",
    function_names=("letter_grade", "grade_for", "score_to_letter"),
    requests=("I need a function that turns an exam score into a letter grade for my class.",
              "Write the letter grade of a test score, the way I grade.",
              "Can you convert my students' scores to letters A, B, C or F?"),
    defaults={"a": 90, "b": 80, "c": 70, "invalid": "invalid"},
    code=_grade_code,
    arguments=lambda p: [f"({p['a']},)", f"({p['a'] - 1},)", f"({p['b']},)", f"({p['b'] - 1},)", f"({p['c']},)",
                         f"({p['c'] - 1},)", "(100,)", "(0,)", "(120,)", "(-5,)"],
    facts=lambda p: [
        Fact(("a", "b", "c"), ("cut-off", "cutoff", "threshold", "boundar"),
             f"A is {p['a']} or more, B is {p['b']} or more, C is {p['c']} or more; anything lower is F.",
             "What are the score cut-offs for A, B and C?"),
        Fact(("invalid",), ("below 0", "above 100", "out of range", "invalid"), _OUT_OF_RANGE[p["invalid"]],
             "What should happen with scores below 0 or above 100?")],
)


def _late_fee_code(fn: str, p: dict) -> str:
    return (f"def {fn}(days_late):\n    charged_days = max(0, days_late - {p['grace']})\n"
            f"    return min(charged_days * {p['per_day']}, {p['cap']})\n")


LATE_FEE = Family(
    name="late_fee",
    grid={"grace": (0, 1, 2, 3, 5), "per_day": (0.25, 0.5, 1.0, 2.0), "cap": (5, 10, 15, 20)},
    args="days_late",
    function_names=("late_fee", "overdue_charge", "library_fine"),
    requests=("I need a function for the fee we charge when a book comes back late.",
              "Write the overdue charge for a rental returned some days late.",
              "Can you compute our library fine from how many days late an item is?"),
    defaults={"grace": 0, "per_day": 1.0, "cap": 10},
    code=_late_fee_code,
    arguments=lambda p: ["(0,)", f"({p['grace']},)", f"({p['grace'] + 1},)", f"({p['grace'] + 2},)",
                         f"({p['grace'] + 5},)", "(30,)", "(100,)", "(1,)",
                         f"({p['grace'] + int(p['cap'] / p['per_day']) - 1},)"],
    facts=lambda p: [
        Fact(("grace",), ("grace", "free days", "before the fee"),
             f"The first {p['grace']} days late are free." if p["grace"] else "The fee starts on the first day late.",
             "Is there a grace period before the fee starts?"),
        Fact(("per_day",), ("per day", "daily", "each day"), f"We charge {p['per_day']} dollars per day.",
             "How much is charged per day late?"),
        Fact(("cap",), ("maximum", "cap", "at most", "limit"), f"The fee never goes above {p['cap']} dollars.",
             "Is there a maximum fee?")],
)


def _password_code(fn: str, p: dict) -> str:
    lines = [f"def {fn}(password):", f"    if len(password) < {p['min_length']}:", "        return False"]
    for needed, test in (("digit", "ch.isdigit()"), ("upper", "ch.isupper()"), ("symbol", "not ch.isalnum()")):
        if p[needed]:
            lines += [f"    if not any({test} for ch in password):", "        return False"]
    return "\n".join(lines + ["    return True", ""])


def _password_arguments(p: dict) -> list[str]:
    n = p["min_length"]
    return [repr(("Ab1!" + "x" * (n - 5),)), repr(("Ab1!" + "x" * (n - 4),)), repr(("Abc!" + "x" * n,)),
            repr(("ab1!" + "x" * n,)), repr(("Ab12" + "x" * n,)), repr(("x" * 20,)), repr(("",)),
            repr(("ABCDEFGH1!xyz",))]


PASSWORD = Family(
    name="password",
    grid={"min_length": (6, 8, 10, 12), "digit": (True, False), "upper": (True, False), "symbol": (True, False)},
    args="password",
    function_names=("is_valid_password", "password_ok", "strong_enough"),
    requests=("I need a function that checks whether a new password follows our rules.",
              "Write a password check for our sign-up form, please.",
              "Can you tell me if a password is strong enough by our policy?"),
    defaults={"min_length": 8, "digit": True, "upper": True, "symbol": False},
    code=_password_code,
    arguments=_password_arguments,
    facts=lambda p: [
        Fact(("min_length",), ("how long", "length", "characters"),
             f"It must be at least {p['min_length']} characters long.", "How long must a password be?"),
        Fact(("digit",), ("digit", "number"), "It must contain a digit." if p["digit"] else "Digits are optional.",
             "Does it need a digit?"),
        Fact(("upper",), ("uppercase", "capital", "upper-case"),
             "It needs an uppercase letter." if p["upper"] else "Uppercase letters are optional.",
             "Does it need an uppercase letter?"),
        Fact(("symbol",), ("symbol", "special", "punctuation"),
             "It needs a symbol such as ! or #." if p["symbol"] else "Symbols are optional.",
             "Does it need a special character?")],
)


def _split_code(fn: str, p: dict) -> str:
    rounding = {"cent": "round(share, 2)", "up": "math.ceil(share * 100) / 100", "whole": "float(round(share))"}
    return (f"import math\n\n\ndef {fn}(bill, people):\n    total = bill * (1 + {p['tax']} / 100) * "
            f"(1 + {p['tip']} / 100)\n    share = total / people\n    return {rounding[p['rounding']]}\n")


_ROUNDING = {"cent": "Round each share to the nearest cent.", "up": "Round each share up to the next cent.",
             "whole": "Round each share to whole dollars."}

SPLIT_BILL = Family(
    name="split_bill",
    grid={"tip": (0, 10, 15, 18, 20), "tax": (0, 5, 8, 10), "rounding": ("cent", "up", "whole")},
    args="bill, people",
    function_names=("split_bill", "share_per_person", "each_pays"),
    requests=("I need a function for how much each of us pays when we split a restaurant bill.",
              "Write what one person owes when a group shares the bill.",
              "Can you split a dinner bill between friends for me?"),
    defaults={"tip": 15, "tax": 0, "rounding": "cent"},
    code=_split_code,
    arguments=lambda p: ["(100, 4)", "(59.99, 3)", "(10, 3)", "(250, 7)", "(0, 2)", "(33.33, 1)", "(1234.56, 5)",
                         "(75.5, 6)", "(47.11, 3)", "(10.01, 4)"],
    facts=lambda p: [
        Fact(("tip",), ("tip", "gratuity"), f"We always leave a {p['tip']}% tip." if p["tip"] else
             "We do not tip.", "Do you add a tip, and how much?"),
        Fact(("tax",), ("tax",), f"Add {p['tax']}% tax first." if p["tax"] else "The bill already includes tax.",
             "Is tax included in the bill?"),
        Fact(("rounding",), ("round", "cents", "decimal"), _ROUNDING[p["rounding"]],
             "How should each share be rounded?")],
)


def _long_words_code(fn: str, p: dict) -> str:
    lines = [f"def {fn}(text):", "    words = [w.strip('.,!?;:').lower() for w in text.split()]"]
    if p["skip_numbers"]:
        lines.append("    words = [w for w in words if not w.isdigit()]")
    lines.append(f"    long_words = [w for w in words if len(w) >= {p['min_letters']}]")
    lines.append("    return len(set(long_words))" if p["unique"] else "    return len(long_words)")
    return "\n".join(lines + [""])


LONG_WORDS = Family(
    name="long_words",
    grid={"min_letters": (3, 4, 5, 6, 7), "unique": (True, False), "skip_numbers": (True, False)},
    args="text",
    function_names=("count_long_words", "long_word_count", "big_words"),
    requests=("I need a function that counts the long words in a text.",
              "Write how many long words a sentence has.",
              "Can you count the longer words of a piece of text for my reading tool?"),
    defaults={"min_letters": 5, "unique": False, "skip_numbers": False},
    code=_long_words_code,
    arguments=lambda p: [repr((text,)) for text in (
        "The cat sat on the mat", "Apple apple APPLE banana", "Hello, hello! Wonderful world.",
        "a bb ccc dddd eeeee ffffff ggggggg hhhhhhhh", "In 2024 we sold 150000 apples and 12 pears", "",
        "Call 5551234 or 911 today", "Banana banana bananas cherry CHERRY amazing Amazing")],
    facts=lambda p: [
        Fact(("min_letters",), ("how long", "letters", "length", "characters"),
             f"A word is long when it has {p['min_letters']} letters or more.", "How many letters make a word long?"),
        Fact(("unique",), ("repeat", "duplicate", "unique", "twice"),
             "Count a repeated word once, whatever its case." if p["unique"] else
             "Count every occurrence, repeats too.", "Should a repeated word count more than once?"),
        Fact(("skip_numbers",), ("number", "digit"),
             "Numbers like 2024 are not words." if p["skip_numbers"] else "Numbers count as words too.",
             "Do numbers count as words?")],
)


def _ranking_code(fn: str, p: dict) -> str:
    lines = [f"def {fn}(scores):", "    items = list(scores.items())"]
    if p["ties"] == "name":
        lines.append("    items.sort(key=lambda item: item[0])")
    elif p["ties"] == "name_desc":
        lines.append("    items.sort(key=lambda item: item[0], reverse=True)")
    lines += [f"    items.sort(key=lambda item: item[1], reverse={p['descending']})",
              "    names = [name for name, _ in items]"]
    lines.append(f"    return names[:{p['top']}]" if p["top"] else "    return names")
    return "\n".join(lines + [""])


_TIES = {"name": "Players with the same score go in alphabetical order.",
         "name_desc": "Players with the same score go in reverse alphabetical order.",
         "first": "Players with the same score keep the order they were entered in."}

RANKING = Family(
    name="ranking",
    grid={"descending": (True, False), "ties": ("name", "name_desc", "first"), "top": (0, 3, 5)},
    args="scores",
    function_names=("rank_players", "leaderboard", "standings"),
    requests=("I need a function that ranks the players of our game from a dict of name to points.",
              "Write the leaderboard of a tournament from everyone's score.",
              "Can you list our players in ranking order given their points?"),
    defaults={"descending": True, "ties": "first", "top": 0},
    code=_ranking_code,
    arguments=lambda p: [repr((scores,)) for scores in (
        {"ann": 5, "bob": 7}, {"zed": 3, "amy": 3, "kim": 9}, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6},
        {"max": 10, "lea": 10, "ian": 10, "joe": 2}, {"solo": 1}, {"p": 4, "q": 4, "r": 1, "s": 8, "t": 8, "u": 0},
        {"x": 0, "y": -1, "w": 5, "v": 5, "o": 2, "n": 9, "m": 9}, {"eve": 2, "dan": 2})],
    facts=lambda p: [
        Fact(("descending",), ("highest", "lowest", "order", "descending", "ascending"),
             "Highest score first." if p["descending"] else "Lowest score first (it is golf).",
             "Should the highest or the lowest score come first?"),
        Fact(("ties",), ("tie", "same score", "equal"), _TIES[p["ties"]], "What happens when two players tie?"),
        Fact(("top",), ("how many", "top", "limit", "all of them"),
             f"Only the top {p['top']} names." if p["top"] else "Return every player.",
             "Should I return all players or only the top few?")],
)

FAMILIES = {family.name: family for family in
            (DISCOUNT, SHIPPING, GRADE, LATE_FEE, PASSWORD, SPLIT_BILL, LONG_WORDS, RANKING)}
