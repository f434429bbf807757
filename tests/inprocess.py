"""The server loop without Ray: a Grid that hands each message straight to the ClientApp, in this process.

Fast tests of `flip_fl.experiments.run.execute` (the same loop, records, checkpoints and end-of-run files as
a real run) and of what survives a resume. `silent(message, partition)` picks messages a node never
answers (a stuck client); `on_push(messages)` sees every batch as it is sent (e.g. to request a stop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from flip_fl.federation.client_app import app as default_client_app

RUN_ID = 4242


class LocalGrid(Grid):
    """`num_nodes` simulated nodes (random-looking node ids, partitions 0 ... n-1) answering synchronously."""

    def __init__(self, num_nodes: int, client_app: ClientApp = default_client_app,
                 silent: Callable[[Message, int], bool] = lambda message, partition: False,
                 on_push: Callable[[list[Message]], None] = lambda messages: None) -> None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
        ids = np.random.default_rng(num_nodes).choice(10**9, size=num_nodes, replace=False) + 10**9
        self.partition = {int(node): pid for pid, node in enumerate(ids)}
        self.contexts = {node: Context(run_id=RUN_ID, node_id=node, node_config={"partition-id": pid},
                                       state=RecordDict(), run_config={}) for node, pid in self.partition.items()}
        self.client_app, self.silent, self.on_push = client_app, silent, on_push
        self.replies: dict[str, Message] = {}
        self.sent = 0

    def set_run(self, run: object) -> None:  # type: ignore[override]
        raise NotImplementedError

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partition)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.on_push(messages)
        ids = []
        for msg in messages:
            self.sent += 1
            msg.metadata.__dict__["_message_id"] = message_id = f"m{self.sent}"
            ids.append(message_id)
            node = msg.metadata.dst_node_id
            if self.silent(msg, self.partition[node]):
                continue
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as err:  # as Flower's runtime does: the error travels back as an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
