// The KEDA objects given as a JSON array (argv[2]) against KEDA's CRD schemas, as the npm package
// @kubernetes-models/keda ships them (generated from KEDA's CRDs); exit 1 when one is invalid.
import { readFileSync } from "node:fs";
import { ScaledObject, TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1";
const kinds = { ScaledObject, TriggerAuthentication };
const objects = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const obj of objects) {
  try { new kinds[obj.kind](obj).validate(); console.log(`ok ${obj.kind}/${obj.metadata.name}`); }
  catch (e) { failed++; console.log(`INVALID ${obj.kind}/${obj.metadata.name}: ${e.message}`); }
}
process.exit(failed ? 1 : 0);
