"""A failed nightly reaches a person: the automation `kdflow: nightly-smoke failed`.

When a flow run of `distill/nightly-smoke` fails or crashes, the Prefect server's automations
service posts Slack/Teams-style JSON (`{"text": "..."}`) through the Custom Webhook block
`kdflow-alerts`: the run's name, its final state, its failure message (for a failed gate:
`run <name> failed its gates: F-DISTILL-... (observed); ...`, i.e. the failed falsifiers) and its
link in the UI. One run that fails produces one event, hence one message.

    export KDFLOW_ALERT_WEBHOOK_URL=https://hooks.slack.com/services/...   # or a Teams incoming webhook
    python -m flows.alerts             # what `make up` runs (deploy/local.sh)
    python -m flows.alerts --url URL   # the same, URL given here

The URL is kept in the block, not in the automation: change it in the UI (Blocks > kdflow-alerts) or
run this again with a new URL. Without a URL and without the block, no automation is created and
this says so (exit 0: a local stack without alerts is allowed, but not silently).
"""

from __future__ import annotations

import argparse
import os
import sys
from uuid import UUID

BLOCK_NAME = "kdflow-alerts"
AUTOMATION_NAME = "kdflow: nightly-smoke failed"
NIGHTLY = "distill/nightly-smoke"
URL_ENV = "KDFLOW_ALERT_WEBHOOK_URL"
FAILED_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")

# Jinja templates rendered by the server when the automation fires (flow_run/deployment are looked up
# from the event's resources). The block puts them into {"text": "<subject>\n<body>"}.
SUBJECT = "kdflow nightly {{ flow_run.name }} {{ flow_run.state.name | upper }}"
BODY = ("Run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} ended {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}")


def save_webhook_block(url: str) -> UUID:
    """Create or overwrite the webhook block with `url`; returns its block document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(name="kdflow nightly alerts", url=url, method="POST",
                                           json_data={"text": "{{subject}}\n{{body}}"})
    block.save(BLOCK_NAME, overwrite=True)
    return block._block_document_id


def existing_block_id() -> UUID | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            doc = client.read_block_document_by_name(BLOCK_NAME, block_type_slug="custom-webhook")
        except ObjectNotFound:
            return None
    return doc.id


def ensure_nightly_alert(url: str | None = None, deployment: str = NIGHTLY) -> UUID | None:
    """(Re)create the automation for `deployment`; returns its id, or None when no webhook is configured."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    block_id = save_webhook_block(url) if url else existing_block_id()
    if block_id is None:
        return None
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        for old in client.read_automations_by_name(AUTOMATION_NAME):  # idempotent: `make up` runs it every time
            client.delete_automation(old.id)
        return client.create_automation(AutomationCore(
            name=AUTOMATION_NAME,
            description=f"Notify the {BLOCK_NAME} webhook when a {deployment} run fails or crashes.",
            trigger=EventTrigger(
                expect=set(FAILED_EVENTS),
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.id": f"prefect.deployment.{dep.id}"},
                posture=Posture.Reactive, threshold=1, within=0,
            ),
            actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
        ))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get(URL_ENV) or None,
                   help=f"webhook URL (Slack/Teams incoming webhook); default ${URL_ENV}")
    p.add_argument("--deployment", default=NIGHTLY)
    args = p.parse_args(argv)
    automation = ensure_nightly_alert(args.url, args.deployment)
    if automation is None:
        print(f"  ALERTS OFF: a failed {args.deployment} will notify no one. Set {URL_ENV} (Slack/Teams "
              f"webhook URL) and run `make up` again, or create the Custom Webhook block {BLOCK_NAME!r}.")
    else:
        print(f"  automation {AUTOMATION_NAME!r}: a failed or crashed {args.deployment} run posts to "
              f"block {BLOCK_NAME!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
