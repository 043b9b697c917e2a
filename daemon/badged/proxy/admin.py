"""``SecretService`` on the admin socket: operators set, rotate, delete and list the
proxy's static secrets (``badgectl secret``). Nothing here returns a value."""

from __future__ import annotations

import grpc

from badged.proxy.secretstore import SecretEntry, SecretStore
from badged.service.auth import require_operator, resolve_caller
from badged.service.deps import ServiceDeps
from badged.service.errors import Ctx
from badged_proto.v1 import secrets_pb2, secrets_pb2_grpc


def _info(e: SecretEntry, state: str = "active") -> secrets_pb2.SecretInfo:
    return secrets_pb2.SecretInfo(name=e.name, version=e.version, created_at=e.created_at,
                                  updated_at=e.updated_at, state=state)


class SecretServicer(secrets_pb2_grpc.SecretServiceServicer):
    def __init__(self, deps: ServiceDeps, store: SecretStore) -> None:
        self._d = deps
        self._store = store

    def _operator(self, context: Ctx) -> dict[str, object]:
        _, proc = resolve_caller(self._d, context, "admin")
        require_operator(self._d, proc)
        return proc.summary()

    async def SetSecret(self, request: secrets_pb2.SetSecretRequest,
                        context: Ctx) -> secrets_pb2.SecretInfo:
        caller = self._operator(context)
        entry = await self._store.set(request.name, request.value, rotate=request.rotate,
                                      caller=caller, audit=self._d.audit.append,
                                      run=self._d.signing.run)
        return _info(entry)

    async def DeleteSecret(self, request: secrets_pb2.DeleteSecretRequest,
                           context: Ctx) -> secrets_pb2.SecretInfo:
        caller = self._operator(context)
        entry = await self._store.delete(request.name, caller=caller,
                                         audit=self._d.audit.append)
        return _info(entry, "deleted")

    async def ListSecrets(self, request: secrets_pb2.ListSecretsRequest,
                          context: Ctx) -> secrets_pb2.ListSecretsResponse:
        self._operator(context)
        return secrets_pb2.ListSecretsResponse(secrets=[_info(e) for e in self._store.list()])


def add_to_server(server: grpc.aio.Server, deps: ServiceDeps, store: SecretStore) -> None:
    secrets_pb2_grpc.add_SecretServiceServicer_to_server(SecretServicer(deps, store), server)
