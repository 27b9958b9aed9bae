#!/bin/sh
# A CGI shim for `orchctl event`, for any server that speaks CGI (Apache mod_cgi,
# lighttpd mod_cgi, nginx with fcgiwrap, ...). The server hands over the request body on
# stdin (CONTENT_LENGTH bytes) and the headers as HTTP_X_PLANE_DELIVERY,
# HTTP_X_PLANE_EVENT and HTTP_X_PLANE_SIGNATURE; they reach orchctl as its ORCH_PLANE_*
# environment, never through a shell. The exit code becomes the HTTP status, so Plane
# retries what may succeed later (5xx) and the log shows what never will (4xx).
# orchctl is $ORCHCTL, else the one on PATH. Documented in docs/plane-webhook.md.
set -u

reply() { # status, body
  printf 'Status: %s\r\nContent-Type: %s\r\n\r\n%s\n' "$1" "${3:-text/plain; charset=utf-8}" "$2"
  exit 0
}

[ "${REQUEST_METHOD:-}" = POST ] || reply "405 Method Not Allowed" "POST only"
len=${CONTENT_LENGTH:-}
case "$len" in
  '' | *[!0-9]*) reply "411 Length Required" "a Content-Length is required" ;;
esac
[ "$len" -le 1048576 ] || reply "413 Payload Too Large" "a delivery is at most 1 MiB"

err=$(mktemp) || reply "500 Internal Server Error" "cannot create a temporary file"
trap 'rm -f "$err"' EXIT
# `head -c` reads exactly the body: a CGI server need not close stdin after it.
out=$(head -c "$len" | ORCH_PLANE_DELIVERY="${HTTP_X_PLANE_DELIVERY:-}" \
  ORCH_PLANE_EVENT="${HTTP_X_PLANE_EVENT:-}" ORCH_PLANE_SIGNATURE="${HTTP_X_PLANE_SIGNATURE:-}" \
  "${ORCHCTL:-orchctl}" --format json event 2>"$err")
rc=$?
case $rc in
  0) reply "200 OK" "$out" "application/json" ;;
  65) status="400 Bad Request" ;;
  77) status="401 Unauthorized" ;;
  75) status="503 Service Unavailable" ;;
  *) status="500 Internal Server Error" ;;
esac
reply "$status" "$(cat "$err")"
