"""PanDA pilot error codes (generated from ``pilot/data/error-codes.tsv``; do not edit).

Regenerate with ``python tools/gen_errorcodes.py``.  The numbers are PanDA's and must
never change: the server, monitoring and retry logic key on them.
"""

from enum import IntEnum


class ErrorCode(IntEnum):
    """A PanDA pilot error number; ``STANDARD_MESSAGES`` holds its standard text."""

    GENERALERROR = 1008
    NOLOCALSPACE = 1098
    STAGEINFAILED = 1099
    REPLICANOTFOUND = 1100
    NOSUCHFILE = 1103
    USERDIRTOOLARGE = 1104
    STDOUTTOOBIG = 1106
    SETUPFAILURE = 1110
    NFSSQLITE = 1115
    QUEUEDATA = 1116
    QUEUEDATANOTOK = 1117
    OUTPUTFILETOOLARGE = 1124
    NOSTORAGE = 1133
    STAGEOUTFAILED = 1137
    PUTMD5MISMATCH = 1141
    CHMODTRF = 1143
    PANDAKILL = 1144
    GETMD5MISMATCH = 1145
    TRFDOWNLOADFAILURE = 1149
    LOOPINGJOB = 1150
    STAGEINTIMEOUT = 1151
    STAGEOUTTIMEOUT = 1152
    NOPROXY = 1163
    MISSINGOUTPUTFILE = 1165
    SIZETOOLARGE = 1168
    GETADMISMATCH = 1171
    PUTADMISMATCH = 1172
    NOVOMSPROXY = 1177
    GETGLOBUSSYSERR = 1180
    PUTGLOBUSSYSERR = 1181
    NOSOFTWAREDIR = 1186
    NOPAYLOADMETADATA = 1187
    LFNTOOLONG = 1190
    ZEROFILESIZE = 1191
    MKDIR = 1199
    KILLSIGNAL = 1200
    SIGTERM = 1201
    SIGQUIT = 1202
    SIGSEGV = 1203
    SIGXCPU = 1204
    USERKILL = 1205
    SIGBUS = 1206
    SIGUSR1 = 1207
    SIGINT = 1208
    MISSINGINSTALLATION = 1211
    PAYLOADOUTOFMEMORY = 1212
    REACHEDMAXTIME = 1213
    UNKNOWNPAYLOADFAILURE = 1220
    FILEEXISTS = 1221
    BADALLOC = 1223
    ESRECOVERABLE = 1224
    ESFATAL = 1228
    EXECUTEDCLONEJOB = 1234
    PAYLOADEXCEEDMAXMEM = 1235
    FAILEDBYSERVER = 1236
    ESNOEVENTS = 1238
    MESSAGEHANDLINGFAILURE = 1240
    CHKSUMNOTSUP = 1242
    NORELEASEFOUND = 1244
    NOUSERTARBALL = 1246
    BADXML = 1247
    NOTIMPLEMENTED = 1300
    UNKNOWNEXCEPTION = 1301
    CONVERSIONFAILURE = 1302
    FILEHANDLINGFAILURE = 1303
    PAYLOADEXECUTIONFAILURE = 1305
    SINGULARITYGENERALFAILURE = 1306
    SINGULARITYNOLOOPDEVICES = 1307
    SINGULARITYBINDPOINTFAILURE = 1308
    SINGULARITYIMAGEMOUNTFAILURE = 1309
    PAYLOADEXECUTIONEXCEPTION = 1310
    NOTDEFINED = 1311
    NOTSAMELENGTH = 1312
    NOSTORAGEPROTOCOL = 1313
    UNKNOWNCHECKSUMTYPE = 1314
    UNKNOWNTRFFAILURE = 1315
    RUCIOSERVICEUNAVAILABLE = 1316
    EXCEEDEDMAXWAITTIME = 1317
    COMMUNICATIONFAILURE = 1318
    INTERNALPILOTPROBLEM = 1319
    LOGFILECREATIONFAILURE = 1320
    RUCIOLOCATIONFAILED = 1321
    RUCIOLISTREPLICASFAILED = 1322
    UNKNOWNCOPYTOOL = 1323
    SERVICENOTAVAILABLE = 1324
    SINGULARITYNOTINSTALLED = 1325
    NOREPLICAS = 1326
    UNREACHABLENETWORK = 1327
    PAYLOADSIGSEGV = 1328
    NONDETERMINISTICDDM = 1329
    JSONRETRIEVALTIMEOUT = 1330
    MISSINGINPUTFILE = 1331
    BLACKHOLE = 1332
    NOREMOTESPACE = 1333
    SETUPFATAL = 1334
    MISSINGUSERCODE = 1335
    JOBALREADYRUNNING = 1336
    BADMEMORYMONITORJSON = 1337
    STAGEINAUTHENTICATIONFAILURE = 1338
    DBRELEASEFAILURE = 1339
    SINGULARITYNEWUSERNAMESPACE = 1340
    BADQUEUECONFIGURATION = 1341
    MIDDLEWAREIMPORTFAILURE = 1342
    NOOUTPUTINJOBREPORT = 1343
    RESOURCEUNAVAILABLE = 1344
    SINGULARITYFAILEDUSERNAMESPACE = 1345
    TRANSFORMNOTFOUND = 1346
    UNSUPPORTEDSL5OS = 1347
    SINGULARITYRESOURCEUNAVAILABLE = 1348
    UNRECOGNIZEDTRFARGUMENTS = 1349
    EMPTYOUTPUTFILE = 1350
    UNRECOGNIZEDTRFSTDERR = 1351
    STATFILEPROBLEM = 1352
    NOSUCHPROCESS = 1353
    GENERALCPUCALCPROBLEM = 1354
    COREDUMP = 1355
    PREPROCESSFAILURE = 1356
    POSTPROCESSFAILURE = 1357
    MISSINGRELEASEUNPACKED = 1358
    PANDAQUEUENOTACTIVE = 1359
    IMAGENOTFOUND = 1360
    REMOTEFILECOULDNOTBEOPENED = 1361
    XRDCPERROR = 1362
    KILLPAYLOAD = 1363
    MISSINGCREDENTIALS = 1364
    NOCTYPES = 1365
    CHECKSUMCALCFAILURE = 1366
    COMMANDTIMEDOUT = 1367
    REMOTEFILEOPENTIMEDOUT = 1368
    FRONTIER = 1369
    VOMSPROXYABOUTTOEXPIRE = 1370
    BADOUTPUTFILENAME = 1371
    APPTAINERNOTINSTALLED = 1372
    CERTIFICATEHASEXPIRED = 1373
    REMOTEFILEDICTDOESNOTEXIST = 1374
    LEASETIME = 1375
    LOGCREATIONTIMEOUT = 1376
    CVMFSISNOTALIVE = 1377
    LSETUPTIMEDOUT = 1378
    PREEMPTION = 1379
    ARCPROXYFAILURE = 1380
    ARCPROXYLIBFAILURE = 1381
    PROXYTOOSHORT = 1382
    STAGEOUTAUTHENTICATIONFAILURE = 1383
    QUEUENOTSETUPFORCONTAINERS = 1384
    NOJOBSINPANDA = 1385
    PANDAQUEUENOTONLINE = 1386


STANDARD_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.GENERALERROR: "Unspecified pilot failure; see batch log",
    ErrorCode.NOLOCALSPACE: "Insufficient free disk space on the worker node",
    ErrorCode.STAGEINFAILED: "Input file transfer did not succeed",
    ErrorCode.REPLICANOTFOUND: "No usable replica located for an input file",
    ErrorCode.NOSUCHFILE: "Expected file or directory is absent",
    ErrorCode.USERDIRTOOLARGE: "Job work directory exceeded its size limit",
    ErrorCode.STDOUTTOOBIG: "Payload stdout or log file exceeded size limit",
    ErrorCode.SETUPFAILURE: "Payload environment setup failed",
    ErrorCode.NFSSQLITE: "SQLite database locking problem on shared filesystem",
    ErrorCode.QUEUEDATA: "Queue configuration could not be downloaded",
    ErrorCode.QUEUEDATANOTOK: "Downloaded queue configuration is invalid",
    ErrorCode.OUTPUTFILETOOLARGE: "An output file exceeded the maximum allowed size",
    ErrorCode.NOSTORAGE: "No storage endpoint configured for the requested activity",
    ErrorCode.STAGEOUTFAILED: "Output or log file transfer did not succeed",
    ErrorCode.PUTMD5MISMATCH: "MD5 checksum mismatch after output transfer",
    ErrorCode.CHMODTRF: "Could not make the transform executable",
    ErrorCode.PANDAKILL: "Job killed on instruction from the PanDA server",
    ErrorCode.GETMD5MISMATCH: "MD5 checksum mismatch after input transfer",
    ErrorCode.TRFDOWNLOADFAILURE: "Transform script download failed",
    ErrorCode.LOOPINGJOB: "Payload stopped touching files; killed as looping",
    ErrorCode.STAGEINTIMEOUT: "Input transfer exceeded its time limit",
    ErrorCode.STAGEOUTTIMEOUT: "Output transfer exceeded its time limit",
    ErrorCode.NOPROXY: "Grid proxy missing or invalid",
    ErrorCode.MISSINGOUTPUTFILE: "Expected local output file not found",
    ErrorCode.SIZETOOLARGE: "Total input size exceeds the allowed maximum",
    ErrorCode.GETADMISMATCH: "Adler32 checksum mismatch on input file",
    ErrorCode.PUTADMISMATCH: "Adler32 checksum mismatch on output file",
    ErrorCode.NOVOMSPROXY: "VOMS proxy missing or invalid",
    ErrorCode.GETGLOBUSSYSERR: "Globus system error while staging in",
    ErrorCode.PUTGLOBUSSYSERR: "Globus system error while staging out",
    ErrorCode.NOSOFTWAREDIR: "Software directory is not present",
    ErrorCode.NOPAYLOADMETADATA: "Payload did not produce metadata",
    ErrorCode.LFNTOOLONG: "Logical file name longer than 255 characters",
    ErrorCode.ZEROFILESIZE: "File size reported as zero",
    ErrorCode.MKDIR: "Directory creation failed",
    ErrorCode.KILLSIGNAL: "Terminated by an unrecognised signal",
    ErrorCode.SIGTERM: "Terminated by SIGTERM",
    ErrorCode.SIGQUIT: "Terminated by SIGQUIT",
    ErrorCode.SIGSEGV: "Terminated by SIGSEGV",
    ErrorCode.SIGXCPU: "Terminated by SIGXCPU (CPU limit)",
    ErrorCode.USERKILL: "Reserved: job killed by the user",
    ErrorCode.SIGBUS: "Terminated by SIGBUS",
    ErrorCode.SIGUSR1: "Terminated by SIGUSR1",
    ErrorCode.SIGINT: "Terminated by SIGINT",
    ErrorCode.MISSINGINSTALLATION: "Required software installation not found",
    ErrorCode.PAYLOADOUTOFMEMORY: "Payload exhausted available memory",
    ErrorCode.REACHEDMAXTIME: "Batch or queue wall-time limit reached",
    ErrorCode.UNKNOWNPAYLOADFAILURE: "Payload failed for an unidentified reason",
    ErrorCode.FILEEXISTS: "Destination file already exists",
    ErrorCode.BADALLOC: "Transform failed with a bad_alloc allocation error",
    ErrorCode.ESRECOVERABLE: "Event service error that can be retried",
    ErrorCode.ESFATAL: "Event service error that cannot be retried",
    ErrorCode.EXECUTEDCLONEJOB: "Another clone of this job already ran",
    ErrorCode.PAYLOADEXCEEDMAXMEM: "Payload memory (PSS) above the allowed limit; killed",
    ErrorCode.FAILEDBYSERVER: "Job marked failed by the server",
    ErrorCode.ESNOEVENTS: "Event service job received no events",
    ErrorCode.MESSAGEHANDLINGFAILURE: "Could not process a message from the payload",
    ErrorCode.CHKSUMNOTSUP: "Remote checksum query unsupported by storage",
    ErrorCode.NORELEASEFOUND: "No matching software release candidates",
    ErrorCode.NOUSERTARBALL: "User source tarball not downloadable from server",
    ErrorCode.BADXML: "Malformed XML encountered",
    ErrorCode.NOTIMPLEMENTED: "Requested class or function not implemented",
    ErrorCode.UNKNOWNEXCEPTION: "Unexpected exception inside the pilot",
    ErrorCode.CONVERSIONFAILURE: "Object data conversion failed",
    ErrorCode.FILEHANDLINGFAILURE: "Generic file operation failure",
    ErrorCode.PAYLOADEXECUTIONFAILURE: "Payload command could not run or returned failure",
    ErrorCode.SINGULARITYGENERALFAILURE: "Generic Singularity/Apptainer failure",
    ErrorCode.SINGULARITYNOLOOPDEVICES: "Container runtime ran out of loop devices",
    ErrorCode.SINGULARITYBINDPOINTFAILURE: "Container runtime refused a requested bind mount",
    ErrorCode.SINGULARITYIMAGEMOUNTFAILURE: "Container image could not be mounted",
    ErrorCode.PAYLOADEXECUTIONEXCEPTION: "Exception raised while running the payload",
    ErrorCode.NOTDEFINED: "Required value is not defined",
    ErrorCode.NOTSAMELENGTH: "Lists expected to match in length do not",
    ErrorCode.NOSTORAGEPROTOCOL: "Storage endpoint has no protocol defined",
    ErrorCode.UNKNOWNCHECKSUMTYPE: "Checksum type not recognised",
    ErrorCode.UNKNOWNTRFFAILURE: "Transform failed with an unrecognised code",
    ErrorCode.RUCIOSERVICEUNAVAILABLE: "Rucio service reported unavailable",
    ErrorCode.EXCEEDEDMAXWAITTIME: "Waited longer than the maximum allowed time",
    ErrorCode.COMMUNICATIONFAILURE: "Could not communicate with the PanDA server",
    ErrorCode.INTERNALPILOTPROBLEM: "Internal pilot problem; see pilot log",
    ErrorCode.LOGFILECREATIONFAILURE: "Job log tarball creation failed",
    ErrorCode.RUCIOLOCATIONFAILED: "Could not determine client location for Rucio",
    ErrorCode.RUCIOLISTREPLICASFAILED: "Rucio replica listing failed",
    ErrorCode.UNKNOWNCOPYTOOL: "Configured copytool name is not known",
    ErrorCode.SERVICENOTAVAILABLE: "Remote service temporarily unavailable",
    ErrorCode.SINGULARITYNOTINSTALLED: "Singularity binary not installed",
    ErrorCode.NOREPLICAS: "Replica listing returned no matching replicas",
    ErrorCode.UNREACHABLENETWORK: "Network unreachable during stage-in",
    ErrorCode.PAYLOADSIGSEGV: "Payload reported a segmentation fault",
    ErrorCode.NONDETERMINISTICDDM: "Cannot build SURL for non-deterministic storage",
    ErrorCode.JSONRETRIEVALTIMEOUT: "Timed out retrieving JSON data",
    ErrorCode.MISSINGINPUTFILE: "Input file missing on the storage element",
    ErrorCode.BLACKHOLE: "File system behaving as a black hole",
    ErrorCode.NOREMOTESPACE: "Remote storage has no space left",
    ErrorCode.SETUPFATAL: "Payload setup raised a fatal exception",
    ErrorCode.MISSINGUSERCODE: "User code missing on server; resubmit with new code",
    ErrorCode.JOBALREADYRUNNING: "Same job already running elsewhere",
    ErrorCode.BADMEMORYMONITORJSON: "Memory monitor output unreadable or malformed",
    ErrorCode.STAGEINAUTHENTICATIONFAILURE: "Authentication rejected during stage-in",
    ErrorCode.DBRELEASEFAILURE: "Local DBRelease preparation failed",
    ErrorCode.SINGULARITYNEWUSERNAMESPACE: "Container runtime could not start NEWUSER namespace",
    ErrorCode.BADQUEUECONFIGURATION: "Queue configuration is inconsistent",
    ErrorCode.MIDDLEWAREIMPORTFAILURE: "Middleware module import failed",
    ErrorCode.NOOUTPUTINJOBREPORT: "Job report lists no output files",
    ErrorCode.RESOURCEUNAVAILABLE: "System resource temporarily unavailable",
    ErrorCode.SINGULARITYFAILEDUSERNAMESPACE: "Container runtime could not create user namespace",
    ErrorCode.TRANSFORMNOTFOUND: "Transform command not found",
    ErrorCode.UNSUPPORTEDSL5OS: "SL5 operating system no longer supported",
    ErrorCode.SINGULARITYRESOURCEUNAVAILABLE: "Container runtime hit a temporary resource shortage",
    ErrorCode.UNRECOGNIZEDTRFARGUMENTS: "Transform rejected its arguments",
    ErrorCode.EMPTYOUTPUTFILE: "An output file has zero size",
    ErrorCode.UNRECOGNIZEDTRFSTDERR: "Fatal but unclassified message in transform stderr",
    ErrorCode.STATFILEPROBLEM: "Could not read proc stat file for CPU time",
    ErrorCode.NOSUCHPROCESS: "Process vanished during CPU time calculation",
    ErrorCode.GENERALCPUCALCPROBLEM: "CPU consumption calculation failed",
    ErrorCode.COREDUMP: "Core dump from the payload found",
    ErrorCode.PREPROCESSFAILURE: "Pre-process command failed",
    ErrorCode.POSTPROCESSFAILURE: "Post-process command failed",
    ErrorCode.MISSINGRELEASEUNPACKED: "Release setup missing in unpacked container",
    ErrorCode.PANDAQUEUENOTACTIVE: "PanDA queue state is not ACTIVE",
    ErrorCode.IMAGENOTFOUND: "Container image not found",
    ErrorCode.REMOTEFILECOULDNOTBEOPENED: "Remote input file open test failed",
    ErrorCode.XRDCPERROR: "xrdcp could not open the file",
    ErrorCode.KILLPAYLOAD: "Kill-payload instruction (not an error; Raythena)",
    ErrorCode.MISSINGCREDENTIALS: "No credentials available for S3 transfer",
    ErrorCode.NOCTYPES: "Python ctypes module unavailable on node",
    ErrorCode.CHECKSUMCALCFAILURE: "Local checksum computation failed",
    ErrorCode.COMMANDTIMEDOUT: "Subprocess exceeded its timeout",
    ErrorCode.REMOTEFILEOPENTIMEDOUT: "Remote file open test timed out",
    ErrorCode.FRONTIER: "Frontier conditions database error",
    ErrorCode.VOMSPROXYABOUTTOEXPIRE: "Internal: proxy near expiry, triggers proxy download",
    ErrorCode.BADOUTPUTFILENAME: "Output file name has illegal characters",
    ErrorCode.APPTAINERNOTINSTALLED: "Apptainer binary not installed",
    ErrorCode.CERTIFICATEHASEXPIRED: "Certificate or proxy has expired",
    ErrorCode.REMOTEFILEDICTDOESNOTEXIST: "Remote-open result dictionary file missing",
    ErrorCode.LEASETIME: "Internal: stager pod lease time expired",
    ErrorCode.LOGCREATIONTIMEOUT: "Log tarball creation timed out",
    ErrorCode.CVMFSISNOTALIVE: "CVMFS not responding at startup",
    ErrorCode.LSETUPTIMEDOUT: "lsetup timed out during remote file open",
    ErrorCode.PREEMPTION: "Job preempted (Kubernetes SIGTERM)",
    ErrorCode.ARCPROXYFAILURE: "arcproxy tool failed",
    ErrorCode.ARCPROXYLIBFAILURE: "arcproxy failed loading shared libraries",
    ErrorCode.PROXYTOOSHORT: "Proxy lifetime too short at startup",
    ErrorCode.STAGEOUTAUTHENTICATIONFAILURE: "Authentication rejected during stage-out",
    ErrorCode.QUEUENOTSETUPFORCONTAINERS: "Queue lacks container configuration in CRIC",
    ErrorCode.NOJOBSINPANDA: "Internal: no jobs available (HPC)",
    ErrorCode.PANDAQUEUENOTONLINE: "PanDA queue status is offline",
}
