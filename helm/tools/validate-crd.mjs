// Validates ServiceMonitor objects (JSON array on stdin) with the validator
// npm's @kubernetes-models/prometheus-operator generates from the
// prometheus-operator CRD. Prints one line per object; exit 1 on any error.
// Run from a directory where that package is installed (helm/check.sh).
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const obj of JSON.parse(input)) {
  try {
    new ServiceMonitor(obj).validate();
    console.log(`valid: ServiceMonitor/${obj.metadata.name}`);
  } catch (e) {
    failed++;
    console.log(`INVALID: ServiceMonitor/${obj.metadata?.name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
