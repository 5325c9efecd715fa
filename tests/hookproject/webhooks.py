"""The hooks, declared as durian declares them; the config names this module
in [python] modules."""

from __future__ import annotations

from cdc_hooks import Hook, ModelHook, hooks

from .models import Member, Person


class PersonHook(ModelHook):
    name = "person"
    model = Person
    provides_args = ("name", "address")  # field names: address is column street_address


hooks.register(PersonHook)


class MemberHook(ModelHook):
    name = "member"
    model = Member
    events = ("insert", "update", "delete")
    provides_args = ("name", "city")  # attribute name: column full_name


hooks.register(MemberHook)

# A custom hook, both ways durian allows: an instance, and a subclass.
hooks.register(Hook(name="myhook", provides_args=["name", "address"]))


class AuditHook(Hook):
    name = "audit"
    provides_args = ("message",)


hooks.register(AuditHook)
