"""AppTown tasks: worlds and instructions generated from a template and a seed, their unit tests, and a scripted
expert that solves them (or makes realistic mistakes at a given rate).

Instructions quote names and texts as the Python code writes them ('Ada Stone'), so a model copies the same tokens
from the task into its code: a tiny model trained from scratch on a CPU learns that in minutes.

A task id is "<template>/<seed>". Splits use disjoint seed ranges. A task's unit tests read the final world state and
the answer given to `complete_task`; the reward is the fraction that pass.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

FIRST_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June", "Kai", "Lena", "Milo", "Nia",
               "Omar", "Pia"]
LAST_NAMES = ["Stone", "Park", "Reyes", "Novak", "Ito", "Berg", "Moss", "Quinn"]
PHRASES = ["see you at noon", "the report is ready", "call me back", "lunch is on me", "the meeting moved to 3pm",
           "happy birthday", "running late", "thanks for the help"]
TEMPLATES = ("message", "pay", "email", "balance", "reply")
SPLIT_SEEDS = {"train": range(0, 200), "dev": range(1000, 1020), "test": range(2000, 2040)}


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its world, instruction, and what the tests check."""

    task_id: str
    template: str
    instruction: str
    state: dict
    target: dict  # template-specific facts the tests and the expert use (a name, a phone, an amount, ...)


def parse_task_id(task_id: str) -> tuple[str, int]:
    """('message', 17) from 'message/17'."""
    try:
        template, seed = task_id.split("/")
        if template not in TEMPLATES:
            raise ValueError
        return template, int(seed)
    except ValueError:
        raise ValueError(f"unknown AppTown task {task_id!r}; expected '<template>/<seed>' with template one of "
                         f"{', '.join(TEMPLATES)}") from None


def split_tasks(split: str) -> list[str]:
    """Every task id of a split."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown AppTown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    return [f"{template}/{seed}" for seed in SPLIT_SEEDS[split] for template in TEMPLATES]


def _world(rng: random.Random) -> dict:
    """Six contacts (several sharing a first name, so a search needs the full name), a balance, an inbox."""
    firsts = rng.sample(FIRST_NAMES, 4)
    names = []
    while len(names) < 6:
        name = f"{rng.choice(firsts)} {rng.choice(LAST_NAMES)}"
        if name not in names:
            names.append(name)
    phones = rng.sample(range(1000, 9999), 7)
    contacts = [{"name": name, "phone": f"555-{phone}", "email": f"{name.split()[0].lower()}."
                 f"{name.split()[1].lower()}@mail.town"} for name, phone in zip(names, phones)]
    inbox = [{"from": c["name"], "phone": c["phone"], "text": rng.choice(PHRASES)}
             for c in rng.sample(contacts, 3)]
    return {"owner": {"name": "Sam Lee", "phone": f"555-{phones[6]}"}, "contacts": contacts,
            "wallet": {"balance": float(rng.randrange(100, 500)), "transactions": []}, "inbox": inbox}


def make_task(task_id: str) -> Task:
    """Generate the task `task_id` (deterministic)."""
    template, seed = parse_task_id(task_id)
    rng = random.Random(seed * 1009 + TEMPLATES.index(template))
    state = _world(rng)
    person = rng.choice(state["contacts"])
    if template == "message":
        text = rng.choice(PHRASES)
        instruction = f"Send a text message to '{person['name']}' saying '{text}'."
        target = {"name": person["name"], "phone": person["phone"], "text": text}
    elif template == "pay":
        amount = float(rng.randrange(5, 60))
        instruction = f"Send ${amount:g} to '{person['name']}' from your wallet."
        target = {"name": person["name"], "phone": person["phone"], "amount": amount,
                  "balance": state["wallet"]["balance"]}
    elif template == "email":
        instruction = f"What is the email address of '{person['name']}'? Answer with the address."
        target = {"name": person["name"], "email": person["email"]}
    elif template == "balance":
        instruction = "How much money is in your wallet? Answer with the number of dollars."
        target = {"balance": state["wallet"]["balance"]}
    else:
        sender = state["inbox"][-1] if rng.random() < 0.5 else rng.choice(state["inbox"])
        text = rng.choice(PHRASES)
        instruction = f"Reply to the message from '{sender['from']}' with '{text}'."
        target = {"name": sender["from"], "phone": sender["phone"], "text": text}
    return Task(task_id, template, instruction, state, target)


# ---- unit tests ---------------------------------------------------------------------------------------------------

Check = Callable[[dict, dict], bool]


def _sent_to(final: dict, phone: str) -> list[dict]:
    return [m for m in final["sent"] if m["to"] == phone]


def unit_tests(task: Task) -> list[tuple[str, Check]]:
    """(name, check(final_state, target)) pairs; each check is True when the test passes."""
    completed: tuple[str, Check] = ("task completed", lambda s, t: bool(s["completed"]))
    # Side effects are checked together with the answer, so doing nothing earns nothing beyond "completed".
    untouched: Check = lambda s, t: not s["sent"] and not s["wallet"]["transactions"]  # noqa: E731
    if task.template in ("message", "reply"):
        return [
            ("message sent to the right person", lambda s, t: bool(_sent_to(s, t["phone"]))),
            ("message text is exact", lambda s, t: any(m["text"] == t["text"] for m in _sent_to(s, t["phone"]))),
            ("only that person messaged", lambda s, t: bool(s["sent"]) and all(m["to"] == t["phone"]
                                                                              for m in s["sent"])),
            completed,
        ]
    if task.template == "pay":
        return [
            ("money sent to the right person", lambda s, t: any(x["to"] == t["phone"]
                                                                for x in s["wallet"]["transactions"])),
            ("amount is exact", lambda s, t: [x["amount"] for x in s["wallet"]["transactions"]] == [t["amount"]]),
            ("balance fell by the amount", lambda s, t: abs(s["wallet"]["balance"] - (t["balance"] - t["amount"]))
             < 1e-6),
            completed,
        ]
    if task.template == "email":
        right = lambda s, t: str(s["answer"]).strip().lower() == t["email"]  # noqa: E731
    else:
        right = lambda s, t: _as_number(s["answer"]) == t["balance"]  # noqa: E731
    return [("answer is right", right), ("answered without side effects", lambda s, t: right(s, t) and untouched(s, t)),
            completed]


def _as_number(value) -> float | None:
    try:
        return float(str(value).replace("$", "").replace(",", "").strip())
    except (TypeError, ValueError):
        return None


def score(task: Task, final: dict) -> tuple[float, dict]:
    """Reward (fraction of tests passed) and info for a final state."""
    results = [(name, bool(check(final, task.target))) for name, check in unit_tests(task)]
    passed = sum(ok for _, ok in results)
    info = {"tests_passed": passed, "tests_total": len(results), "success": passed == len(results),
            "failed_tests": [name for name, ok in results if not ok]}
    return passed / len(results), info


# ---- the scripted expert ------------------------------------------------------------------------------------------

MISTAKES = ("skip_docs", "wrong_api", "dummy_value", "give_up")


def _turn(thought: str, code: str) -> str:
    return f"{thought}\n```python\n{code}\n```"


def goal(task: Task) -> str:
    """The task restated in one sentence, quoting the facts the code will need."""
    t = task.target
    if task.template == "message":
        return f"Goal: text '{t['name']}' saying '{t['text']}'."
    if task.template == "pay":
        return f"Goal: pay ${t['amount']:g} to '{t['name']}'."
    if task.template == "email":
        return f"Goal: answer with the email address of '{t['name']}'."
    if task.template == "balance":
        return "Goal: answer with my wallet balance."
    return f"Goal: reply to '{t['name']}' with '{t['text']}'."


def expert_turns(task: Task, mistake_rate: float = 0.0, rng: random.Random | None = None) -> list[str]:
    """The expert's turns for `task`; each mistake kind happens with probability `mistake_rate`.

    The first turn opens by restating the goal (a plan line, as ReAct agents write). Mistakes: skip the doc look-up;
    call an API that does not exist (then correct it next turn); use a made-up (dummy) value instead of the
    looked-up one; give up after an error and complete the task unsolved.
    """
    turns = _expert_steps(task, mistake_rate, rng or random.Random(0))
    return [f"{goal(task)} {turns[0]}", *turns[1:]]


def _expert_steps(task: Task, mistake_rate: float, rng: random.Random) -> list[str]:
    mistakes = {kind for kind in MISTAKES if rng.random() < mistake_rate}
    t = task.target
    app = {"message": "contacts", "pay": "contacts", "email": "contacts", "balance": "wallet",
           "reply": "messages"}[task.template]
    turns = []
    if "skip_docs" not in mistakes:
        turns.append(_turn(f"First I check which APIs the {app} app has.",
                           f"print(apis.api_docs.show_api_descriptions(app_name='{app}'))"))
    if "wrong_api" in mistakes:
        wrong = {"contacts": f"apis.contacts.find(name='{t.get('name', '')}')", "wallet": "apis.wallet.get_balance()",
                 "messages": "apis.messages.list_messages()"}[app]
        turns.append(_turn("I look up what I need.", f"result = {wrong}\nprint(result)"))
        if "give_up" in mistakes:
            turns.append(_turn("That failed, so I stop here.", "apis.supervisor.complete_task()"))
            return turns
    dummy = "dummy_value" in mistakes
    if task.template in ("message", "pay", "email"):
        turns.append(_turn(f"I find '{t['name']}' in my contacts.",
                           f"matches = apis.contacts.search(query='{t['name']}')\nprint(matches)"))
    elif task.template == "reply":
        turns.append(_turn(f"I find the message from '{t['name']}'.",
                           f"messages = [m for m in apis.messages.inbox() if m['from'] == '{t['name']}']\n"
                           "print(messages)"))
    if task.template == "message":
        phone = "'555-0000'" if dummy else "matches[0]['phone']"
        code = (f"apis.messages.send(to={phone}, text='{t['text']}')\nprint(apis.messages.sent())\n"
                "apis.supervisor.complete_task()")
        turns.append(_turn("I send the message, check it went out, and finish.", code))
    elif task.template == "reply":
        text = "dummy" if dummy else t["text"]
        code = (f"apis.messages.send(to=messages[-1]['phone'], text='{text}')\nprint(apis.messages.sent())\n"
                "apis.supervisor.complete_task()")
        turns.append(_turn("I reply, check it went out, and finish.", code))
    elif task.template == "pay":
        amount = "1.0" if dummy else f"{t['amount']:g}"
        code = (f"apis.wallet.transfer(to=matches[0]['phone'], amount={amount})\n"
                "print(apis.wallet.balance())\napis.supervisor.complete_task()")
        turns.append(_turn("I send the money, check my balance, and finish.", code))
    elif task.template == "email":
        answer = "'dummy@mail.town'" if dummy else "matches[0]['email']"
        turns.append(_turn("I answer with the email address.", f"apis.supervisor.complete_task(answer={answer})"))
    else:
        if dummy:
            code = "apis.supervisor.complete_task(answer=100)"
        else:
            code = "balance = apis.wallet.balance()\nprint(balance)\napis.supervisor.complete_task(answer=balance)"
        turns.append(_turn("I read the balance and answer with it.", code))
    return turns
