// pm2 apps of the subnet-34 node. Each app is a bash start script that reads its settings from an env file at the
// repository root (miner.env / validator.env, see scripts/*.env.example), so this file never needs editing.
//
//   miner:      pm2 start scripts/ecosystem.config.js --only bitmind_miner,bitmind_autoupdate
//   validator:  pm2 start scripts/ecosystem.config.js --only bitmind_validator,bitmind_generator,bitmind_autoupdate
//   then:       pm2 save && pm2 startup    (restart the apps after a reboot)
"use strict";

const path = require("path");

const REPO_ROOT = path.resolve(__dirname, "..");

// Shared pm2 settings: restart on any exit (crash, watchdog exit code 75), but give up (status "errored") after
// 10 restarts that each lived less than a minute, e.g. a missing env file, instead of looping forever.
function app(name, script, overrides = {}) {
  return {
    name,
    script: path.join(__dirname, script),
    interpreter: "bash",
    cwd: REPO_ROOT,
    autorestart: true,
    min_uptime: "60s",
    max_restarts: 10,
    restart_delay: 10000, // ms before a restart, so a crash loop does not hammer the chain endpoint
    kill_timeout: 30000, // ms between SIGINT and SIGKILL, time to finish a request and save state
    time: true, // prefix every log line with a timestamp
    merge_logs: true,
    ...overrides,
  };
}

module.exports = {
  apps: [
    app("bitmind_miner", "start_miner.sh"),
    // The validator persists scores and history on shutdown: allow it a minute.
    app("bitmind_validator", "start_validator.sh", { kill_timeout: 60000 }),
    app("bitmind_generator", "start_generator.sh"),
    // Polls git every AUTOUPDATE_INTERVAL s; it is idle in between, so restarts are cheap.
    app("bitmind_autoupdate", "auto_update.sh", { kill_timeout: 5000, min_uptime: "10s" }),
  ],
};
