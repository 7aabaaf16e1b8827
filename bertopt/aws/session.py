"""boto3 session and clients (standard retry mode), credential check, AWS error mapping and
waiting on SageMaker waiters with progress and a timeout. The only module that imports boto3."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from .. import logs
from ..errors import BackendUnavailable, ConfigError, PipelineError

log = logging.getLogger("bertopt.aws.session")

NO_CREDENTIALS = ("no AWS credentials found: configure them the standard boto3 way (`aws configure` or "
                  "AWS_PROFILE / --aws-profile, AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, or an instance/SSO "
                  "role); nothing was created")
NOT_FOUND_CODES = {"ResourceNotFoundException", "NoSuchBucket", "NoSuchKey", "NotFound", "404",
                   "RepositoryNotFoundException", "NoSuchEntity", "NoSuchUpload", "ObjectNotFoundException"}
ACCESS_CODES = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError"}


def _boto3():
    try:
        import boto3
    except ImportError:
        raise BackendUnavailable("boto3 is not installed (pip install boto3)") from None
    return boto3


def error_code(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def error_message(exc) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Message", "")) or str(exc)


def is_not_found(exc) -> bool:
    code, msg = error_code(exc), error_message(exc)
    if code in NOT_FOUND_CODES:
        return True
    msg = msg.lower()
    return code == "ValidationException" and any(s in msg for s in ("could not find", "does not exist",
                                                                     "no scalable target found"))


def aws_error(exc, action: str) -> PipelineError:
    """A botocore error as a one-line PipelineError that says what was being done."""
    code, msg = error_code(exc), error_message(exc)
    hint = ""
    if code in ACCESS_CODES or "not authorized" in msg.lower():
        hint = " (the credentials lack an IAM permission; see README 'Deploy to SageMaker' for the list)"
    elif code in ("ThrottlingException", "Throttling", "TooManyRequestsException", "SlowDown"):
        hint = " (still throttled after the retries; try again later or raise --max-attempts)"
    return PipelineError(f"AWS error while {action}: {code or type(exc).__name__}: {msg}{hint}")


class Aws:
    """A boto3 session with cached clients (botocore standard retries with backoff). ``clients``
    pre-seeds clients, e.g. a Stubber-wrapped one in tests."""

    def __init__(self, region: Optional[str] = None, profile: Optional[str] = None, max_attempts: int = 8,
                 clients: Optional[dict] = None):
        boto3 = _boto3()
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound

        try:
            self.session = boto3.Session(profile_name=profile, region_name=region)
        except ProfileNotFound:
            raise ConfigError(f"--aws-profile {profile}: no such profile in ~/.aws/config") from None
        self.region = self.session.region_name
        if not self.region:
            raise ConfigError("no AWS region: pass --aws-region (or set AWS_REGION or a profile region)")
        self.partition = self.session.get_partition_for_region(self.region)
        self.config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                             user_agent_extra="bertopt")
        self._clients = dict(clients or {})
        self.account: Optional[str] = None

    def client(self, name: str):
        if name not in self._clients:
            self._clients[name] = self.session.client(name, config=self.config)
        return self._clients[name]

    def identity(self) -> str:
        """The account id of the credentials; a PipelineError before anything is created when
        there are none or AWS rejects them. Secrets are never logged."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if self.session.get_credentials() is None:
            raise PipelineError(NO_CREDENTIALS)
        try:
            ident = self.client("sts").get_caller_identity()
        except NoCredentialsError:
            raise PipelineError(NO_CREDENTIALS) from None
        except ClientError as exc:
            raise PipelineError(f"AWS rejected the credentials ({error_code(exc)}: {error_message(exc)}); "
                                "nothing was created") from None
        except BotoCoreError as exc:
            raise PipelineError(f"cannot reach AWS STS in {self.region}: {exc}") from None
        self.account = str(ident["Account"])
        log.info("AWS account %s, region %s", self.account, self.region)
        return self.account

    def arn(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account or ''}:{resource}"


@dataclass
class WaitResult:
    state: str                 # success | failure | timeout
    elapsed: float
    last: dict = field(default_factory=dict)
    reason: str = ""


def wait(aws: Aws, waiter_name: str, *, timeout: float, poll: float, what: str, pending_states=(),
         **kwargs) -> WaitResult:
    """Poll a botocore waiter (one attempt per poll) until it succeeds, reaches a failure state or
    ``timeout`` seconds pass; logs each status change and shows a progress bar. A failure match whose
    EndpointStatus is in ``pending_states`` keeps waiting (e.g. a Failed endpoint being deleted)."""
    from botocore.exceptions import WaiterError

    waiter = aws.client("sagemaker").get_waiter(waiter_name)
    start = time.monotonic()
    last_status = None
    with logs.progress(total=int(timeout), desc=what, unit="s", bar_format="{desc}: {n:.0f}s {postfix}") as bar:
        while True:
            elapsed = time.monotonic() - start
            try:
                waiter.wait(WaiterConfig={"Delay": 1, "MaxAttempts": 1}, **kwargs)
                log.info("%s: done after %.0fs", what, elapsed)
                return WaitResult("success", elapsed)
            except WaiterError as exc:
                last = exc.last_response or {}
                reason = str(exc.kwargs.get("reason", exc))
                if not reason.startswith("Max attempts exceeded") and last.get("EndpointStatus") not in pending_states:
                    return WaitResult("failure", elapsed, last, reason)
            status = last.get("EndpointStatus") or error_code_from(last) or "?"
            if status != last_status:
                log.info("%s: %s (%.0fs)", what, status, elapsed)
                last_status = status
            bar.n = int(elapsed)
            bar.set_postfix_str(status)
            if elapsed + poll > timeout:
                return WaitResult("timeout", elapsed, last, f"still {status} after {elapsed:.0f}s")
            time.sleep(poll)


def error_code_from(response: dict) -> str:
    return str((response or {}).get("Error", {}).get("Code", ""))
