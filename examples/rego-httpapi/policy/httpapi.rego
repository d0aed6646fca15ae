# An HTTP API policy in opa-envoy-plugin style: `authz` is the object
# opa-envoy-plugin reads (allowed, headers, http_status, body), so the same
# file runs behind Envoy ext_authz, nginx auth_request and the JSON API.
#
# The caller is named by the authenticating proxy in front, which sets
# x-user and x-roles (comma-separated) and strips any the client sent.
package httpapi

import rego.v1

request := input.request

user := request.headers["x-user"]

roles contains role if {
	some part in split(object.get(request.headers, "x-roles", ""), ",")
	role := trim_space(part)
	role != ""
}

segments := [s | some s in split(trim(request.path, "/"), "/")]

reads := {"GET", "HEAD"}

default allow := false

# Anyone may read the public part of the API.
allow if {
	request.method in reads
	segments[0] == "api"
	segments[1] == "public"
}

# An order is read by its owner (data.owners) and by support.
allow if {
	request.method in reads
	["api", "orders", id] = segments
	data.owners[id] == user
}

allow if {
	request.method in reads
	segments[0] == "api"
	segments[1] == "orders"
	"support" in roles
}

# Clerks create orders; admins do anything.
allow if {
	request.method == "POST"
	segments == ["api", "orders"]
	"clerk" in roles
}

allow if "admin" in roles

default authz := {
	"allowed": false,
	"http_status": 401,
	"body": "no user: the proxy in front sets x-user",
}

authz := {
	"allowed": true,
	"headers": {"x-user": user, "x-roles": concat(",", sort([r | some r in roles]))},
} if {
	user
	allow
}

authz := {
	"allowed": false,
	"http_status": 403,
	"body": sprintf("%s may not %s %s", [user, request.method, request.path]),
} if {
	user
	not allow
}
