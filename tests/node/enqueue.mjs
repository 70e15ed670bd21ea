// How a Node/TypeScript app enqueues a tidemill job: inside its own transaction, with
// tidemill.enqueue(actor, args, queue). The job exists if and only if the transaction commits.
//
//   node enqueue.mjs commit   <actor> '<json args>' <queue>
//   node enqueue.mjs rollback <actor> '<json args>' <queue>
//
// DATABASE_URL names the app's database. Prints the outbox id the call returned.
import pg from "pg";

const [mode, actor, argsJson, queue] = process.argv.slice(2);
const client = new pg.Client({ connectionString: process.env.DATABASE_URL });
await client.connect();
try {
  await client.query("BEGIN");
  // the app's own write, in the same transaction as the job
  await client.query("CREATE TEMP TABLE IF NOT EXISTS app_write (note text)");
  await client.query("INSERT INTO app_write VALUES ($1)", [mode]);
  const { rows } = await client.query(
    "SELECT tidemill.enqueue($1, $2::jsonb, $3) AS id",
    [actor, argsJson, queue],
  );
  if (mode === "commit") {
    await client.query("COMMIT");
  } else {
    await client.query("ROLLBACK");
  }
  console.log(JSON.stringify({ mode, outbox_id: String(rows[0].id) }));
} finally {
  await client.end();
}
