"""AppTown's apps: contacts, wallet, messages, API docs and the supervisor. Runs inside the sandbox.

The agent sees only `apis`, e.g. `apis.contacts.search(query="Ada")`. Every API is a documented Python method;
`apis.api_docs` serves those docs, so the agent can look an API up before calling it. The world's state is plain
JSON-able data, dumped at the end of an episode for the unit tests (which run outside the sandbox).
"""

from __future__ import annotations

import copy
import inspect
import json


class App:
    """Base for apps: public methods are the app's APIs; their docstrings are the API docs."""

    description = ""

    def __init__(self, world: "World") -> None:
        self._world = world

    @classmethod
    def api_names(cls) -> list[str]:
        """Names of the app's APIs."""
        return sorted(name for name, member in vars(cls).items() if callable(member) and not name.startswith("_"))


class Contacts(App):
    description = "People you know: names, phone numbers and email addresses."

    def search(self, query: str) -> list[dict]:
        """Contacts whose name contains `query` (case-insensitive). Each: {"name", "phone", "email"}."""
        query = str(query).lower()
        return [dict(c) for c in self._world.state["contacts"] if query in c["name"].lower()]

    def show(self, phone: str) -> dict:
        """The contact with this phone number."""
        for contact in self._world.state["contacts"]:
            if contact["phone"] == phone:
                return dict(contact)
        raise ValueError(f"no contact with phone {phone!r}")


class Wallet(App):
    description = "Your money: balance, transfers to other people's phone numbers, history."

    def balance(self) -> float:
        """Your current balance in dollars."""
        return round(self._world.state["wallet"]["balance"], 2)

    def transfer(self, to: str, amount: float) -> dict:
        """Send `amount` dollars to the person with phone number `to`. Returns the transaction."""
        phones = {c["phone"] for c in self._world.state["contacts"]}
        if to not in phones:
            raise ValueError(f"no account with phone {to!r}")
        amount = float(amount)
        if amount <= 0 or amount > self._world.state["wallet"]["balance"]:
            raise ValueError(f"invalid amount {amount}")
        self._world.state["wallet"]["balance"] = round(self._world.state["wallet"]["balance"] - amount, 2)
        transaction = {"to": to, "amount": amount}
        self._world.state["wallet"]["transactions"].append(transaction)
        return dict(transaction)

    def transactions(self) -> list[dict]:
        """Every transfer you made, oldest first."""
        return [dict(t) for t in self._world.state["wallet"]["transactions"]]


class Messages(App):
    description = "Text messages: your inbox, and sending messages to phone numbers."

    def inbox(self) -> list[dict]:
        """Messages you received, oldest first. Each: {"from", "phone", "text"}."""
        return [dict(m) for m in self._world.state["inbox"]]

    def send(self, to: str, text: str) -> dict:
        """Send `text` to the phone number `to`. Returns the sent message."""
        phones = {c["phone"] for c in self._world.state["contacts"]}
        if to not in phones:
            raise ValueError(f"no phone number {to!r} in your contacts")
        message = {"to": to, "text": str(text)}
        self._world.state["sent"].append(message)
        return dict(message)

    def sent(self) -> list[dict]:
        """Messages you sent, oldest first."""
        return [dict(m) for m in self._world.state["sent"]]


class Supervisor(App):
    description = "Your supervisor: your profile, and where you report that the task is done."

    def profile(self) -> dict:
        """Your own name and phone number."""
        return dict(self._world.state["owner"])

    def complete_task(self, answer=None) -> str:
        """Call once the task is done; pass `answer` when the task asks a question."""
        self._world.state["completed"] = True
        self._world.state["answer"] = answer if answer is None or isinstance(answer, (int, float, str)) else str(
            answer)
        return "Task marked complete."


class ApiDocs(App):
    description = "Documentation of every app and API."

    def show_app_descriptions(self) -> dict:
        """Every app and what it is for."""
        return {name: app.description for name, app in APPS.items()}

    def show_api_descriptions(self, app_name: str) -> dict:
        """The APIs of one app with a line on each."""
        app = _app(app_name)
        return {name: _first_line(getattr(app, name)) for name in app.api_names()}

    def show_api_doc(self, app_name: str, api_name: str) -> dict:
        """The full doc of one API: its signature and description."""
        app = _app(app_name)
        if api_name not in app.api_names():
            raise ValueError(f"app {app_name!r} has no API {api_name!r}; APIs: {', '.join(app.api_names())}")
        method = getattr(app, api_name)
        signature = str(inspect.signature(method)).replace("self, ", "").replace("(self)", "()")
        return {"api": f"apis.{app_name}.{api_name}{signature}", "description": inspect.getdoc(method)}


APPS = {"contacts": Contacts, "wallet": Wallet, "messages": Messages, "supervisor": Supervisor,
        "api_docs": ApiDocs}


def _app(app_name: str) -> type[App]:
    if app_name not in APPS:
        raise ValueError(f"no app {app_name!r}; apps: {', '.join(APPS)}")
    return APPS[app_name]


def _first_line(method) -> str:
    return (inspect.getdoc(method) or "").split("\n")[0]


class Apis:
    """`apis.<app>.<api>(...)`."""

    def __init__(self, world: "World") -> None:
        for name, app in APPS.items():
            setattr(self, name, app(world))

    def __repr__(self) -> str:
        return f"<apis: {', '.join(APPS)}>"


class World:
    """The state of one episode's apps."""

    def __init__(self, state: dict) -> None:
        self.state = copy.deepcopy(state)
        self.state.setdefault("sent", [])
        self.state.setdefault("completed", False)
        self.state.setdefault("answer", None)
        self.apis = Apis(self)

    def dump(self) -> str:
        """The state as JSON (read by the unit tests)."""
        return json.dumps(self.state)

    # The sandbox's harness serves the world (sandbox.HostSpec): the agent's interpreter holds only a proxy, so
    # agent code reaches the state through the documented APIs alone and cannot rewrite what the tests read.

    def call(self, path: str, args: list, kwargs: dict):
        """Run `apis.<app>.<api>(*args, **kwargs)` for the agent; any other path is refused."""
        app_name, _, api_name = path.partition(".")
        if app_name not in APPS:
            raise AttributeError(f"apis has no app {app_name!r}; apps: {', '.join(APPS)}")
        if api_name not in APPS[app_name].api_names():
            raise AttributeError(f"app {app_name!r} has no API {api_name!r}; APIs: "
                                 f"{', '.join(APPS[app_name].api_names())}")
        return getattr(getattr(self.apis, app_name), api_name)(*args, **kwargs)

    def report(self) -> dict:
        """The state, for the trainer's unit tests."""
        return copy.deepcopy(self.state)
