// Prints the credentials the AWS SDK for JavaScript v3 resolves from IMDS, as
// JSON, for test/e2e_clients_test.go.
//
//   node creds.mjs imds      fromInstanceMetadata() of @aws-sdk/credential-providers
//   node creds.mjs default   defaultProvider() of @aws-sdk/credential-provider-node
//
// The endpoint comes from AWS_EC2_METADATA_SERVICE_ENDPOINT.
import { fromInstanceMetadata } from "@aws-sdk/credential-providers";
import { defaultProvider } from "@aws-sdk/credential-provider-node";

const which = process.argv[2] ?? "imds";
let provider;
switch (which) {
  case "imds":
    provider = fromInstanceMetadata();
    break;
  case "default":
    provider = defaultProvider();
    break;
  default:
    console.error(`unknown provider ${which}`);
    process.exit(2);
}

try {
  const c = await provider();
  process.stdout.write(
    JSON.stringify({
      AccessKeyId: c.accessKeyId,
      SecretAccessKey: c.secretAccessKey,
      SessionToken: c.sessionToken,
      Expiration: c.expiration ? c.expiration.toISOString() : null,
    }) + "\n",
  );
} catch (err) {
  console.error(`${which}: ${err && err.name}: ${err && err.message}`);
  process.exit(1);
}
