"""Reaching an object store: a first-use probe that answers in seconds with
one line, and the storage clients' own exceptions turned into OSError.

Why: on a machine without network or credentials, gcsfs meets a `gs://`
path with ~16 s of credential lookup, then six retries with back-off, each
logged with a traceback, then an aiohttp exception: a run looked hung for a
minute and died with pages of traceback. `check` runs once per bucket (the
first time `sbam_jax.files` touches it) and raises `StoreError`, whose text
says what failed (DNS, connection, credentials, a missing bucket) and what
to do. `as_oserror` lets every caller that handles OSError (a metric write
becomes a WriteError, a save a SaveError) handle store failures too: gcsfs
raises HTTP errors as plain Exceptions.

Only `gs://` is probed; other fsspec schemes go straight to their client.
A bucket name that Cloud Storage could never hold (`gs://`, `gs://Bad
Bucket!/x`) is refused by `check_name` before any request: the client would
otherwise spend the credential lookup and its retries on it, then answer
with an HTTP 400 or a misleading "no such bucket".
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import threading

from sbam_jax.errors import StoreError

PROBE_S = 60.0       # the longest the bucket query may take (credential lookup included)
CONNECT_S = 10.0     # the longest name resolution or the TCP connection may take
GCS_HOST = ("storage.googleapis.com", 443)
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
CLIENT_MODULES = ("gcsfs", "aiohttp", "google.auth", "google.api_core", "requests", "fsspec")
NAME_RULE = ("Cloud Storage bucket names are 3-63 characters (up to 222 with dots, each "
             "dot-separated part 1-63) of lowercase letters, digits, '-', '_' and '.', "
             "starting and ending with a letter or digit")
_NAME_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")


def as_oserror(e: BaseException):
  """An OSError standing for a storage client's failure `e`, or None when `e`
  is already an OSError or not a storage client's."""
  if isinstance(e, OSError) or not type(e).__module__.startswith(CLIENT_MODULES):
    return None
  code = getattr(e, "code", None)
  lines = str(e).strip().splitlines()
  text = f"{type(e).__name__}{f' (HTTP {code})' if code else ''}: {lines[0] if lines else ''}"
  return OSError(errno.EIO, text.rstrip(": "))


_GOOD = set()  # (protocol, bucket, endpoint) that answered


class Watch:
  """Tells a read of one object that failed from a store that is lost, for
  readers whose failures are counted as skips (the input pipeline drops an
  element whose read raises, a StoreError too, and names it as skipped).

  A missing object (gone since the listing) or one refused object is a
  skip; a store that stopped answering (or a bucket deleted meanwhile) would
  otherwise cost each remaining read the client's retries (~30 s) and end as
  thousands of skips. So after a failed read `failed` probes the store again
  (a connection and one bucket query); if that fails, the loss is recorded
  and every later `stop_if_lost` (in the reads, and on the host side that
  names skipped images) raises StoreError: the run stops with one line."""

  def __init__(self, what: str):
    self.what, self.lost = what, ""
    self._lock = threading.Lock()

  def failed(self, url: str, error: Exception) -> None:
    """After a read of `url` raised `error`: raise StoreError if the store is
    lost, else return (the caller re-raises `error`: one object failed)."""
    with self._lock:  # (parallel readers fail together: one probe at a time)
      if not self.lost:
        try:
          if not isinstance(error, StoreError):
            check(url, again=True)
        except StoreError as e:
          error = e
        if isinstance(error, StoreError):
          self.lost = f"{self.what} cannot be read any more: {error}"
    self.stop_if_lost()

  def stop_if_lost(self) -> None:
    if self.lost:
      raise StoreError(self.lost)


def check(url: str, *, again: bool = False) -> None:
  """Raise StoreError unless the bucket of `url` answers. Done once per
  bucket and endpoint; a failure is not remembered, so a repaired network
  is seen at the next call. `again`: probe a bucket that answered before
  (after a failed read: has the store itself gone away?)."""
  protocol, _, rest = str(url).partition("://")
  key = (protocol, rest.split("/", 1)[0], os.environ.get("STORAGE_EMULATOR_HOST", ""))
  if protocol not in ("gs", "gcs") or (key in _GOOD and not again):
    return
  check_name(url, key[1])
  _GOOD.discard(key)
  _quiet_client_logs()
  _check_network(url, key[2])
  _check_bucket(url, *key[:2])
  _GOOD.add(key)


def name_problem(bucket: str) -> str:
  """What is wrong with `bucket` as a Cloud Storage bucket name ('' if nothing)."""
  if not bucket:
    return "the bucket name is empty"
  longest = 222 if "." in bucket else 63
  if not 3 <= len(bucket) <= longest:
    return f"the bucket name has {len(bucket)} characters"
  bad = sorted(set(re.sub(r"[a-z0-9._-]", "", bucket)))
  if bad:
    return f"the bucket name holds {', '.join(map(repr, bad))}"
  if not _NAME_CHARS.fullmatch(bucket):
    return "the bucket name does not start and end with a letter or digit"
  parts = bucket.split(".")
  if "" in parts:
    return "the bucket name has two dots in a row"
  long_part = next((part for part in parts if len(part) > 63), None)
  if long_part:
    return f"its dot-separated part {long_part[:16]}... has {len(long_part)} characters"
  return ""


def check_name(url: str, bucket: str) -> None:
  """Raise StoreError, naming `url` and the rule, unless `bucket` is a valid
  Cloud Storage bucket name (no request is made)."""
  problem = name_problem(bucket)
  if problem:
    raise StoreError(f"{url!r} is not a usable bucket URL: {problem}; {NAME_RULE} "
                     "(e.g. gs://my-bucket/run)")


def _quiet_client_logs() -> None:
  """gcsfs logs each retry's traceback and a warning per bucket-type guess,
  google.auth a warning per credential source it tries; our one-line errors
  say what failed (a level the user set is kept)."""
  for name, level in (("gcsfs", logging.CRITICAL), ("google.auth", logging.ERROR)):
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
      logger.setLevel(level)


def _check_bucket(url: str, protocol: str, bucket: str) -> None:
  """One bucket query (metadata, or a listing where metadata is not
  allowed), credential lookup included, bounded by PROBE_S. Where the
  bucket itself is refused, the path is asked instead: access may be
  granted to a prefix only."""
  found = {}

  def query():
    import fsspec  # pylint: disable=g-import-not-at-top
    fs = fsspec.filesystem(protocol, use_listings_cache=False)
    found["method"] = getattr(getattr(fs, "credentials", None), "method", None)
    try:
      fs.info(bucket)
    except Exception as e:  # pylint: disable=broad-except
      if not _refused(e):
        raise
      fs.exists(str(url).partition("://")[2])  # (a refusal here too is the answer)

  try:
    _within(PROBE_S, query)
  except FileNotFoundError:
    raise StoreError(f"bucket {bucket} does not exist ({url}): create it (gcloud storage "
                     f"buckets create gs://{bucket}) or correct the path") from None
  except TimeoutError:
    raise StoreError(f"no answer from {url} in {PROBE_S:.0f} s (credential lookup and one "
                     "bucket query): check the network and the credentials, or use a local "
                     "path") from None
  except Exception as e:  # pylint: disable=broad-except
    raise StoreError(_refusal(url, bucket, e, found.get("method"))) from None


def _refused(e: Exception) -> bool:
  """Whether `e` is the store refusing access (HTTP 401 / 403, a credential error)."""
  return (getattr(e, "code", None) in (401, 403) or str(e).startswith("Forbidden")
          or type(e).__module__.startswith("google.auth"))


def _refusal(url: str, bucket: str, e: Exception, method) -> str:
  code = getattr(e, "code", None)
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  if _refused(e):
    who = ("without credentials (none were found on this machine)" if method == "anon" else
           f"with the credentials found ({method})" if method else "")
    return (f"access to {url} was refused{f' (HTTP {code})' if code else ''} {who}: give "
            f"these credentials access to bucket {bucket}, or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a key that has it (on a workstation: gcloud "
            "auth application-default login)").replace("  ", " ")
  return (f"cannot use {url}: {type(e).__name__}: {first}: check the network and the "
          "credentials, or use a local path")


def _endpoint(emulator: str):
  """(host, port) that requests go to."""
  if not emulator:
    return GCS_HOST
  hostport = emulator.split("://", 1)[-1].split("/", 1)[0]
  host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
  return host, int(port) if port else (443 if emulator.startswith("https") else 80)


def _within(seconds: float, fn):
  """fn()'s result or exception, or TimeoutError if it has not returned in
  `seconds` (it goes on in a daemon thread, which exit does not wait for)."""
  box = {}

  def call():
    try:
      box["out"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      box["error"] = e

  t = threading.Thread(target=call, daemon=True, name="sbam_jax-store-probe")
  t.start()
  t.join(seconds)
  if t.is_alive():
    raise TimeoutError(f"no answer in {seconds:.0f} s")
  if "error" in box:
    raise box["error"]
  return box.get("out")


def _check_network(url: str, emulator: str) -> None:
  """Name resolution, then a TCP connection to the endpoint (skipped behind
  a proxy, which resolves and connects for us)."""
  if any(os.environ.get(v) for v in PROXY_VARS):
    return
  host, port = _endpoint(emulator)
  where = (f" (STORAGE_EMULATOR_HOST={emulator}: start that server, or unset the variable "
           "to use Google Cloud Storage)" if emulator else "")
  try:
    _within(CONNECT_S, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
  except (OSError, UnicodeError) as e:
    raise StoreError(f"cannot reach {url}: the name {host} does not resolve "
                     f"({getattr(e, 'strerror', None) or e}): this machine has no network "
                     f"or no DNS{where}; fix that, or use a local path") from None
  try:
    socket.create_connection((host, port), timeout=CONNECT_S).close()
  except OSError as e:
    raise StoreError(f"cannot reach {url}: nothing answers at {host}:{port} "
                     f"({e.strerror or e}){where}; check the network and firewall, or use "
                     "a local path") from None
