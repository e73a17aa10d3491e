# Keybroker default attestation policy for CPU TEEs (policy id "default", class "cpu").
#
# It maps verified evidence claims to the EAR trustworthiness vector. Values follow AR4SI:
# 2-31 affirming, 32-95 warning, 96-127 contraindicated. Without matching reference values a
# guest stays contraindicated: executables 33 (unknown code), hardware 97 (unrecognized
# platform), configuration 36 (unsafe or unknown configuration).
#
# query_reference_value(id) returns the reference values registered under `id` (or null).
package policy

import rego.v1

default executables := 33

default hardware := 97

default configuration := 36

trust_claims := {
	"instance-identity": 0,
	"configuration": configuration,
	"executables": executables,
	"file-system": 0,
	"hardware": hardware,
	"runtime-opaque": 0,
	"storage-opaque": 0,
	"sourced-data": 0,
}

# --- sample: the software stand-in TEE ---------------------------------------------------

executables := 3 if {
	input.sample.launch_digest in query_reference_value("launch_digest")
}

hardware := 2 if {
	input.sample.svn in query_reference_value("svn")
	input.sample.platform_version.major == query_reference_value("major_version")
	input.sample.platform_version.minor >= query_reference_value("minimum_minor_version")
}

configuration := 2 if {
	input.sample
	input.sample.debug == false
}

# --- workload identifiers from the init-data agent policy -------------------------------

extensions := [{
	"name": "ear.trustee.identifiers",
	"key": -18,
	"value": {"validated": validated_identifiers},
}]

validated_identifiers := object.union(images, uids)

# In the agent policy's order (an array comprehension keeps it; a set would sort).
image_names := [name |
	some container in input.init_data_claims.agent_policy_claims.containers
	name := container.OCI.Annotations["io.kubernetes.cri.image-name"]
]

user_ids := [uid |
	some container in input.init_data_claims.agent_policy_claims.containers
	uid := container.OCI.Process.User.UID
]

images := {"container_images": image_names} if count(image_names) > 0

else := {}

uids := {"container_uids": user_ids} if count(user_ids) > 0

else := {}
